"""Archives that travel: download (streamed, checksummed), extract (one pass, nothing outside its
folder), install (all or nothing). Shared by the MVTec AD and VisA sources.

Every path here is all-or-nothing: on any failure the destination is left as it was (an old,
complete copy survives; a fresh one never appears half-written) and no temporary files remain.

An archive from a mirror or a file:// URL is bytes from elsewhere (its SHA-256 only proves they are
the bytes the user pinned), so sizes are bounded before they reach the disk: the download, and the
whole decompressed stream, by the source's `max_gb` param (the datasets' own sizes with room to
spare); each member by the largest image preprocess accepts (MAX_MEMBER_BYTES). Sparse members, which
expand to any size, are refused; links and special files are never extracted, each said in one line;
a file member where the archive also has a folder of that name (or the reverse) is one line.
A download killed before it finished (SIGTERM, a CI timeout) leaves its partial file tagged with
the dead process's id, and the next download in that folder removes it.
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import re
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator

from tqdm import tqdm

from stages.core.errors import PipelineError, warn
from stages.core.outputs import _pid_alive, temp_dir_for
from stages.core.outputs import remove_path as _remove
from stages.data.raw import MAX_PIXELS

CHUNK = 1 << 20
USER_AGENT = "Mozilla/5.0 (compatible; mvtec-anomaly-pipeline)"

# One member of a dataset archive is one image, mask or list. The real ones are a few MB at most
# (MVTec AD's 1024 x 1024 PNGs, VisA's JPEGs); the largest image preprocess accepts (MAX_PIXELS, 64 MP)
# stored uncompressed as 16-bit RGB is 384 MiB: no member that could be used is larger.
MAX_MEMBER_BYTES = MAX_PIXELS * 6 + 2**20
MAX_LINK_LINES = 20  # one line per dropped link, then a count


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one archive may take: `total` bytes downloaded and bytes decompressed (each), `member` bytes
    per member; `param` names the setting that raises `total` in the error line."""

    total: int
    param: str
    member: int = MAX_MEMBER_BYTES


class _Bounded:
    """A read-only stream that refuses to give more than `limit` bytes in all (the decompressed tar)."""

    def __init__(self, stream: BinaryIO, limits: Limits, url: str):
        self.stream, self.limits, self.url, self.count = stream, limits, url, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.count += len(chunk)
        if self.count > self.limits.total:
            raise PipelineError(f"{self.url}: unpacks to more than {self.limits.total / 1e9:g} GB, more than the "
                                f"dataset itself; refused (raise {self.limits.param} for a larger archive)")
        return chunk

# What reading a damaged archive can raise (gzip/bz2 raise OSError subclasses). Only reads are
# wrapped with these, so a full disk while writing is not mistaken for a corrupt archive.
_READ_ERRORS = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)


# ---------------------------------------------------------------------------- atomic placement


def _tmp_prefix(dest: Path, tag: str) -> tuple[str, Path]:
    """Prefix and folder of a temporary for `dest`: the project's .tmp/ (tagged with our PID, so a
    later stage removes it if we are killed), or beside `dest` when that is outside the project."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = temp_dir_for(dest)
    if folder is None:
        return f".{dest.name}.{tag}-{os.getpid()}-", dest.parent
    return f"{os.getpid()}-{tag}-{dest.name}-", folder


_PART = re.compile(r"^\..+\.download-(\d+)-.*\.part$")  # .<dest>.download-<pid>-XXXX.part


def _clean_stale_parts(folder: Path) -> None:
    """Remove partial downloads of killed runs (their PID is gone) from `folder`; a live run's stay."""
    for entry in folder.glob(".*.download-*.part"):
        match = _PART.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove(entry)


def _sibling_tmpdir(dest: Path, tag: str) -> Path:
    prefix, folder = _tmp_prefix(dest, tag)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=folder))


def staging_dir(dest: Path) -> Path:
    """A fresh temporary folder on `dest`'s filesystem, to build `dest` in and then `install_dir` it."""
    return _sibling_tmpdir(dest, "tmp")


def install_dir(new: Path, dest: Path) -> None:
    """Move the complete directory `new` onto `dest`; an old `dest` is removed only afterwards."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = _sibling_tmpdir(dest, "old")
        old.rmdir()  # only the unique name is wanted; os.replace needs it absent
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        _remove(old)


# ------------------------------------------------------------------------------------ download


class DownloadError(PipelineError):
    """One URL that gave no usable archive; `reason` is why (HTTP status, checksum, cut connection)."""

    def __init__(self, url: str, reason: str, message: str):
        super().__init__(message)
        self.url, self.reason = url, reason


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return _one_line(f"HTTP {exc.code} {exc.reason}")
    if isinstance(exc, urllib.error.URLError):
        return _one_line(exc.reason) or type(exc).__name__
    return _one_line(exc) or type(exc).__name__


def _download_failed(url: str, reason: str) -> DownloadError:
    return DownloadError(url, reason, f"could not download {url}: {reason}")


def _fetch(url: str, target: Path, timeout: float, limits: Limits | None = None) -> dict[str, str]:
    """Stream `url` into the (already created) file `target`; return its {"sha256", "md5"} hex digests.
    More than `limits.total` bytes (announced or received) is refused before they are all on disk."""
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _download_failed(url, _reason(exc)) from exc
    with response, open(target, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if limits is not None and total is not None and total > limits.total:
            raise _download_failed(url, f"announces {total:,} bytes, more than the limit of {limits.total / 1e9:g} GB "
                                        f"(raise {limits.param} for a larger archive)")
        received = 0
        name = url.rstrip("/").rsplit("/", 1)[-1] or url
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (urllib.error.URLError, OSError, ValueError, EOFError) as exc:
                    raise _download_failed(url, _reason(exc)) from exc
                except Exception as exc:  # http.client.IncompleteRead and friends
                    raise _download_failed(url, f"{type(exc).__name__} {_reason(exc)}") from exc
                if not chunk:
                    break
                if limits is not None and received + len(chunk) > limits.total:
                    raise _download_failed(url, f"sent more than the limit of {limits.total / 1e9:g} GB (raise "
                                                f"{limits.param} for a larger archive)")
                out.write(chunk)
                for digest in digests.values():
                    digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _download_failed(url, f"connection closed after {received} of {total} bytes")
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _checksum_error(url: str, algorithm: str, expected: str, actual: str) -> DownloadError:
    reason = f"{algorithm} checksum mismatch (expected {expected}, got {actual})"
    return DownloadError(url, reason, f"{url}: {reason}")


def _decompressed(raw: BinaryIO) -> ContextManager[BinaryIO]:
    """Wrap `raw` in the decompressor its magic bytes call for (xz, gzip, bzip2; else plain tar).

    The stdlib decompressor files raise EOFError on a truncated stream, which tarfile's own
    'r|*' mode does not report.
    """
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    return contextlib.nullcontext(raw)


def extract_members(archive: Path, into: Path, url: str, select: Callable[[list[str]], list[str] | None],
                    limits: Limits | None = None) -> int:
    """Read the archive once, writing each regular file that `select` maps to a path below `into`.

    `select` gets a member's path components and returns the components to write it at (None:
    skip). Member paths are checked first (no absolute paths, no '..'), links and special files are
    skipped (each said in one line), sparse and oversized members refused, and files are written with
    default permissions, so nothing can land outside `into`, and no more than `limits` allow is read.
    Returns the number of files written.
    """
    limits = limits or Limits(total=2**40, param="the source's max_gb")

    def corrupt(exc: BaseException) -> PipelineError:
        return PipelineError(f"{url}: archive is truncated or corrupt ({_reason(exc) or type(exc).__name__})")

    def collision(name: str) -> PipelineError:
        return PipelineError(f"{url}: member '{name}' collides with another of the same path (a file where the "
                             "archive also has a folder, or the reverse); not an archive of the dataset")

    written, dropped = 0, 0
    with open(archive, "rb") as raw, _decompressed(raw) as decompressed:
        stream = _Bounded(decompressed, limits, url)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")  # one pass: no re-decompression to seek
        except _READ_ERRORS as exc:
            raise corrupt(exc) from exc
        with tar:
            members = iter(tar)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except _READ_ERRORS as exc:
                    raise corrupt(exc) from exc
                name = member.name if len(member.name) <= 200 else member.name[:197] + "..."  # as messages show it
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if member.name.startswith("/") or re.match(r"^[A-Za-z]:", member.name) or ".." in parts:
                    raise PipelineError(f"{url}: unsafe member path '{name}' in archive")
                rel = select(parts)
                if not rel:
                    continue
                target = into.joinpath(*rel)
                if member.isdir():
                    try:
                        target.mkdir(parents=True, exist_ok=True)
                    except (FileExistsError, NotADirectoryError):
                        raise collision(name) from None
                    continue
                if not member.isfile():  # symlinks, hard links, devices, fifos: never extracted
                    dropped += 1
                    if dropped <= MAX_LINK_LINES:
                        kind = ("link" if member.issym() or member.islnk() else "special file")
                        to = f" -> '{member.linkname[:200]}'" if member.linkname else ""
                        warn(f"{url}: {kind} member '{name}'{to} skipped (links and special files are never "
                             "extracted)")
                    continue
                if member.issparse():
                    raise PipelineError(f"{url}: member '{name}' is a sparse file ({member.size:,} bytes once "
                                        "expanded); no dataset file is, so the archive is refused")
                if member.size > limits.member:
                    raise PipelineError(f"{url}: member '{name}' is {member.size:,} bytes, more than any usable image "
                                        f"({limits.member:,}, stages/data/archives.py MAX_MEMBER_BYTES); refused")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise collision(name) from None
                try:
                    src = tar.extractfile(member)
                except _READ_ERRORS as exc:
                    raise corrupt(exc) from exc
                if src is None:
                    continue
                try:
                    out = open(target, "wb")
                except (IsADirectoryError, NotADirectoryError):
                    raise collision(name) from None
                with out:
                    while True:
                        try:
                            chunk = src.read(CHUNK)
                        except _READ_ERRORS as exc:
                            raise corrupt(exc) from exc
                        if not chunk:
                            break
                        out.write(chunk)
                written += 1
        if dropped > MAX_LINK_LINES:
            warn(f"{url}: {dropped - MAX_LINK_LINES} more link or special-file members skipped")
        # tarfile stops at the end-of-archive marker; read the compressed stream to its end so a
        # download cut off in the trailing padding (missing end-of-stream marker/CRC) is caught too.
        try:
            while stream.read(CHUNK):
                pass
        except _READ_ERRORS as exc:
            raise corrupt(exc) from exc
    return written


# -------------------------------------------------------------------------- the download cache
#
# One folder per machine (data.download_dir; by default the user cache) keeps every verified archive
# under a name taken from its URL, so every clone and every queued experiment (DVC runs those in
# temporary copies of the project) reuses one download. In its .records/ folder, `<name>.digests`
# holds an archive's digests with the file's identity (size, times, inode) when they were computed: a
# later stage, or another category of the same archive, reads them there instead of hashing 4.9 GB
# again, and any change to the file makes it hash afresh. A file:// archive is read where it is (never
# copied); only its record lives in the cache. `<name>.lock` there serialises concurrent stages (queue
# workers) on one archive, so the second waits for the first download and then reuses it.

APP = "anomaly-pipeline"  # the user-cache folder name: $XDG_CACHE_HOME/anomaly-pipeline/downloads
DIGESTS = ("sha256", "md5")  # computed together in one pass: published checksums are one or the other
RECORDS = ".records"  # the cache's bookkeeping: digests and locks, beside the archives


def download_dir(value: str | None) -> Path:
    """data.download_dir as a folder: null -> the user cache (platformdirs honours XDG_CACHE_HOME)."""
    if value is None:
        import platformdirs

        return Path(platformdirs.user_cache_dir(APP)) / "downloads"
    return Path(value).expanduser()


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` if needed and prove a file can be written there (as root, permission bits say
    nothing), leaving nothing behind; one line naming `key` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or _reason(exc)
        raise PipelineError(f"{key}: cannot write to {folder} ({reason}); set {key} to a folder you can write "
                            "(null: the user cache)") from exc


def _cache_name(url: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) or "archive"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def local_path(url: str) -> Path | None:
    """The local path a file:// URL names (None for any other URL); the file may not exist."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def local_folder(url: str | None) -> Path | None:
    """The folder a file:// URL names when it is one (an unpacked dataset, read in place), else None."""
    path = local_path(url) if url else None
    return path if path is not None and path.is_dir() else None


def _identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _record_file(archive: Path, cache_dir: Path) -> Path:
    """Where `archive`'s digests are recorded: under its own name for an archive in the cache, under a
    name taken from its resolved path for a file:// archive read in place."""
    if archive.parent.resolve() == cache_dir.resolve():
        return cache_dir / RECORDS / f"{archive.name}.digests"
    return cache_dir / RECORDS / f"{_cache_name(str(archive.resolve()))}.digests"


def _record(archive: Path, cache_dir: Path, digests: dict[str, str], identity: dict) -> None:
    """Write the verification record atomically (a crash leaves the old record or none, never half of one)."""
    target = _record_file(archive, cache_dir)
    target.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({**identity, **digests}, fh)
        os.replace(tmp, target)
    except BaseException:
        _remove(Path(tmp))
        raise


def _hash_file(path: Path, size: int) -> dict[str, str]:
    """Every digest of DIGESTS, in one read of the file."""
    hashes = {name: hashlib.new(name) for name in DIGESTS}
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=f"verify {path.name}") as bar:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            for digest in hashes.values():
                digest.update(chunk)
            bar.update(len(chunk))
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def digest_once(archive: Path, algorithm: str, cache_dir: Path | None) -> str:
    """`archive`'s digest, hashed only when no record in `cache_dir` matches the file as it is now."""
    identity = _identity(archive)
    if cache_dir is not None:
        try:
            recorded = json.loads(_record_file(archive, cache_dir).read_text())
        except (OSError, ValueError):
            recorded = {}
        if isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in identity.items()) \
                and isinstance(recorded.get(algorithm), str):
            return recorded[algorithm]
    digests = _hash_file(archive, identity["size"])
    if cache_dir is not None and _identity(archive) == identity:  # unchanged while it was read
        _record(archive, cache_dir, digests, identity)
    return digests[algorithm]


def _forget(archive: Path, cache_dir: Path) -> None:
    _remove(archive)
    _remove(_record_file(archive, cache_dir))


@contextlib.contextmanager
def _locked(cache_dir: Path | None, name: str) -> Iterator[None]:
    """Hold `<name>.lock` in the cache: one download (and one verification) of an archive at a time."""
    if cache_dir is None:
        yield
        return
    from filelock import FileLock, Timeout

    (cache_dir / RECORDS).mkdir(exist_ok=True)
    lock = FileLock(str(cache_dir / RECORDS / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another stage to finish fetching {name} into {cache_dir}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@dataclasses.dataclass(frozen=True)
class Remote:
    """Where an archive comes from: URLs tried in order, and the checksum every answer must match.

    `what` and `help` are set for the built-in URLs: a failed one is then a warning and the next is
    tried; when all fail, one line lists each URL with its reason, then `help`. A user's own URL
    (`what` empty) fails with its own error.
    """

    urls: tuple[str, ...]
    expected: tuple[str, str] | None  # (algorithm, hex digest); None: nothing known to check against
    what: str = ""
    help: str = ""


def check_sha256(sha256: str | None, key: str) -> str | None:
    """The params value `key` (a SHA-256 or None) as lower-case hex."""
    if sha256 is None:
        return None
    sha256 = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise PipelineError(f"params.yaml: {key} '{sha256}' is not a SHA-256 hex digest (64 hex digits)")
    return sha256


@contextlib.contextmanager
def fetched(remote: Remote, dest: Path, cache_dir: Path | None = None, timeout: float = 60,
            limits: Limits | None = None) -> Iterator[tuple[Path, str]]:
    """Yield (archive file, the URL it came from), verified against `remote.expected` when known;
    a download over `limits.total` bytes is refused while it streams.

    A file:// URL is read where it is: never copied, verified (when a checksum is known) once, the
    digest recorded in `cache_dir`. Any other URL is downloaded; with `cache_dir` the verified archive
    is kept there (named after its URL) and reused by later calls, whichever of `remote.urls` it came
    from, its checksum read from the record rather than hashed again. A temporary download is always
    removed; an unverifiable cached archive is dropped when the `with` body fails on it, so the next
    call fetches it afresh (a file:// archive, the user's own file, never is).
    """
    expected = remote.expected
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"{cache_dir}: cannot create cache folder ({_reason(exc)})") from exc
        _clean_stale_parts(cache_dir)  # a killed run's partial download, whatever this call reads

    local = local_path(remote.urls[0]) if len(remote.urls) == 1 else None
    if local is not None:
        url = remote.urls[0]
        try:
            info = os.stat(local)
        except OSError as exc:
            raise _download_failed(url, f"no such file {local}" if not local.exists() else _reason(exc)) from exc
        if not stat.S_ISREG(info.st_mode):  # /dev/zero as a mirror would never end
            raise _download_failed(url, f"{local} is not a regular file (a device, FIFO or folder); refused")
        if limits is not None and info.st_size > limits.total:
            raise _download_failed(url, f"is {info.st_size:,} bytes, more than the limit of {limits.total / 1e9:g} GB "
                                        f"(raise {limits.param} for a larger archive)")
        if expected is not None:
            with _locked(cache_dir, _cache_name(str(local.resolve()))):
                actual = digest_once(local, expected[0], cache_dir)
            if actual != expected[1]:
                raise _checksum_error(url, expected[0], expected[1], actual)
        yield local, url
        return

    part: Path | None = None  # a temporary download, always removed
    try:
        with _locked(cache_dir, _cache_name(remote.urls[0])):
            archive_path, used, part = _cached_or_downloaded(remote, dest, cache_dir, timeout, limits)
        try:
            yield archive_path, used
        except PipelineError:
            if expected is None and archive_path != part and cache_dir is not None:
                _forget(archive_path, cache_dir)  # unverifiable cache entry is bad: fetch afresh next time
            raise
    finally:
        if part is not None:
            _remove(part)


def _cached_or_downloaded(remote: Remote, dest: Path, cache_dir: Path | None, timeout: float,
                          limits: Limits | None) -> tuple[Path, str, Path | None]:
    """(archive, its URL, the temporary download to remove afterwards or None) for `fetched`."""
    expected = remote.expected
    for url in remote.urls if cache_dir is not None else ():
        cached = cache_dir / _cache_name(url)
        if not cached.is_file():
            continue
        if expected is None or digest_once(cached, expected[0], cache_dir) == expected[1]:
            print(f"using cached {cached}", file=sys.stderr)
            return cached, url, None
        print(f"cached {cached} does not match its {expected[0]}, downloading again", file=sys.stderr)
        _forget(cached, cache_dir)
    failures: list[DownloadError] = []
    for url in remote.urls:
        if cache_dir is not None:  # tagged with our PID: a killed run's part is removed by the next one
            prefix, folder = f".{dest.name}.download-{os.getpid()}-", cache_dir
        else:
            prefix, folder = _tmp_prefix(dest, "download")
        _clean_stale_parts(folder)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=folder)
        os.close(fd)
        part = Path(name)
        try:
            actual = _fetch(url, part, timeout, limits)
            if expected is not None and actual[expected[0]] != expected[1]:
                raise _checksum_error(url, expected[0], expected[1], actual[expected[0]])
        except BaseException as exc:
            _remove(part)
            if not isinstance(exc, DownloadError) or not remote.what:
                raise
            failures.append(exc)
            if url != remote.urls[-1]:
                warn(f"{url}: {exc.reason}; trying the next known URL of {remote.what}")
            continue
        if cache_dir is None:
            return part, url, part
        archive = cache_dir / _cache_name(url)
        try:
            os.replace(part, archive)
            _record(archive, cache_dir, actual, _identity(archive))  # hashed while downloading: never again
        except BaseException:
            _remove(part)
            raise
        return archive, url, None
    tried = "; ".join(f"{f.url} ({f.reason})" for f in failures)
    raise PipelineError(f"could not download {remote.what} from any known URL: {tried}. {remote.help}")
