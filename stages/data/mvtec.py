"""Getting an MVTec AD category onto disk: download + verify + extract, or copy a local folder.

Every path here is all-or-nothing: on any failure the destination is left as it was (an old,
complete copy survives; a fresh one never appears half-written) and no temporary files remain.
The fetch / verify / extract / install helpers are shared with the VisA source (stages/data/visa.py).
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator

from tqdm import tqdm

from stages.errors import PipelineError, warn
from stages.outputs import temp_dir_for
from stages.outputs import remove_path as _remove
from stages.data.raw import check_layout

CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

BASE_URL = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"

_CATEGORY_IDS = {
    "bottle": "420937370-1629951468",
    "cable": "420937413-1629951498",
    "capsule": "420937454-1629951595",
    "carpet": "420937484-1629951672",
    "grid": "420937487-1629951814",
    "hazelnut": "420937545-1629951845",
    "leather": "420937607-1629951964",
    "metal_nut": "420937637-1629952063",
    "pill": "420938129-1629953099",
    "screw": "420938130-1629953152",
    "tile": "420938133-1629953189",
    "toothbrush": "420938134-1629953256",
    "transistor": "420938166-1629953277",
    "wood": "420938383-1629953354",
    "zipper": "420938385-1629953449",
}
CATEGORY_URLS: dict[str, str] = {c: f"{BASE_URL}/{_CATEGORY_IDS[c]}/{c}.tar.xz" for c in CATEGORIES}

# MD5 of each official per-category archive, as open-source MVTec AD loaders publish them
# (anomalib's and torchvision-style dataset helpers); checked whenever the official URL is used.
CATEGORY_MD5 = {
    "bottle": "79b4d46b8647d969e323afef8d8445ff",
    "cable": "2ba411739e8239e7558ead13f18b0ead",
    "capsule": "380afc46701c99cb7b9a928edbe16eb5",
    "carpet": "5ce0a646d054d9e88195bd74c690de4b",
    "grid": "37239e47f99673bb73393b67ca4cc418",
    "hazelnut": "5c30a9e574a762d845ca79cf2f241b01",
    "leather": "e7971b60323840bfc36247e8d9c3598e",
    "metal_nut": "bfbc32e780827923f4b2c61923e364f7",
    "pill": "834e2d57f62cd4d8d74cd0a5775cc48b",
    "screw": "2e817e865841f4947db4ded51c13bb23",
    "tile": "d78d2c0f6d8bbe9cbe3b72a77bc3e328",
    "toothbrush": "53ba30bb7aeac103e28e1b83ae28ffb9",
    "transistor": "4fe2681f0ce1793cbf71d762f926d564",
    "wood": "b2478b1c65e9a470f360cc6173299d58",
    "zipper": "015bfd289a1782abc77318aa015a728d",
}

# The full archive's known URLs, tried in this order: the share has moved before, and every one is
# checked against FULL_ARCHIVE_SHA256, so whichever answers the bytes are the same. Tests point
# this tuple at a local server (monkeypatch); users point data.mvtec.url at one mirror or file.
FULL_ARCHIVE_URLS = (
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
    "mvtec_anomaly_detection.tar.xz",  # published since the share moved
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/download/420938113-1629960298/"
    "mvtec_anomaly_detection.tar.xz",
    f"{BASE_URL}/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
)
FULL_ARCHIVE_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
FULL_ARCHIVE_MD5 = "eefca59f2cede9c3fc5b6befbfec275e"
DOWNLOAD_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
CATEGORY_PLACEHOLDER = "{category}"  # in data.mvtec.url: replaced by each category's name

ARCHIVES = ("full", "category")
CHUNK = 1 << 20
USER_AGENT = "Mozilla/5.0 (compatible; mvtec-anomaly-pipeline)"

# What reading a damaged archive can raise (gzip/bz2 raise OSError subclasses). Only reads are
# wrapped with these, so a full disk while writing is not mistaken for a corrupt archive.
_READ_ERRORS = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)


# --------------------------------------------------------------------------------------- layout


def validate_layout(root: Path) -> None:
    """Check `root` looks like one MVTec AD category: train/good/*.png and test/<type>/*.png."""
    root = Path(root)
    check_layout(root, str(root))


# ---------------------------------------------------------------------------- atomic placement


def _tmp_prefix(dest: Path, tag: str) -> tuple[str, Path]:
    """Prefix and folder of a temporary for `dest`: the project's .tmp/ (tagged with our PID, so a
    later stage removes it if we are killed), or beside `dest` when that is outside the project."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = temp_dir_for(dest)
    if folder is None:
        return f".{dest.name}.{tag}-", dest.parent
    return f"{os.getpid()}-{tag}-{dest.name}-", folder


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


def _fetch(url: str, target: Path, timeout: float) -> dict[str, str]:
    """Stream `url` into the (already created) file `target`; return its {"sha256", "md5"} hex digests."""
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _download_failed(url, _reason(exc)) from exc
    with response, open(target, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
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
                out.write(chunk)
                for digest in digests.values():
                    digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _download_failed(url, f"connection closed after {received} of {total} bytes")
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _digest_of(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def extract_members(archive: Path, into: Path, url: str, select: Callable[[list[str]], list[str] | None]) -> int:
    """Read the archive once, writing each regular file that `select` maps to a path below `into`.

    `select` gets a member's path components and returns the components to write it at (None:
    skip). Member paths are checked first (no absolute paths, no '..'), links and special files are
    skipped, and files are written with default permissions, so nothing can land outside `into`.
    Returns the number of files written.
    """

    def corrupt(exc: BaseException) -> PipelineError:
        return PipelineError(f"{url}: archive is truncated or corrupt ({_reason(exc) or type(exc).__name__})")

    written = 0
    with open(archive, "rb") as raw, _decompressed(raw) as stream:
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
                name = member.name
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                    raise PipelineError(f"{url}: unsafe member path '{name}' in archive")
                rel = select(parts)
                if not rel:
                    continue
                target = into.joinpath(*rel)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():  # symlinks, hard links, devices, fifos
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = tar.extractfile(member)
                except _READ_ERRORS as exc:
                    raise corrupt(exc) from exc
                if src is None:
                    continue
                with open(target, "wb") as out:
                    while True:
                        try:
                            chunk = src.read(CHUNK)
                        except _READ_ERRORS as exc:
                            raise corrupt(exc) from exc
                        if not chunk:
                            break
                        out.write(chunk)
                written += 1
        # tarfile stops at the end-of-archive marker; read the compressed stream to its end so a
        # download cut off in the trailing padding (missing end-of-stream marker/CRC) is caught too.
        try:
            while stream.read(CHUNK):
                pass
        except _READ_ERRORS as exc:
            raise corrupt(exc) from exc
    return written


def _extract_category(archive: Path, category: str, into: Path, url: str) -> int:
    """Extract only the members below the archive's `<category>/` folder (at any depth) into `into`."""
    prefix: tuple[str, ...] | None = None

    def below_category(parts: list[str]) -> list[str] | None:
        nonlocal prefix
        if prefix is None:
            if category not in parts:
                return None
            prefix = tuple(parts[: parts.index(category) + 1])  # the first match fixes the folder
        if tuple(parts[: len(prefix)]) != prefix:
            return None
        return parts[len(prefix):] or None

    written = extract_members(archive, into, url, below_category)
    if prefix is None:
        raise PipelineError(f"{url}: no '{category}/' folder in the archive")
    return written


def _cache_name(url: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]) or "archive"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


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
def fetched(remote: Remote, dest: Path, cache_dir: Path | None = None, timeout: float = 60) -> Iterator[tuple[Path, str]]:
    """Yield (archive file, the URL it came from), verified against `remote.expected` when known.

    With `cache_dir`, a verified archive is kept there (named after its URL) and reused by later
    calls, whichever of `remote.urls` it came from (re-checked when a checksum is known). A temporary
    download is always removed; an unverifiable cached archive is dropped when the `with` body fails
    on it, so the next call fetches it afresh.
    """
    expected = remote.expected
    part_dir: Path | None = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"{cache_dir}: cannot create cache folder ({_reason(exc)})") from exc
        part_dir = cache_dir

    archive_path: Path | None = None
    used: str | None = None
    part: Path | None = None  # a temporary download, always removed
    try:
        for url in remote.urls if cache_dir is not None else ():
            cached = cache_dir / _cache_name(url)
            if not cached.is_file():
                continue
            if expected is None or _digest_of(cached, expected[0]) == expected[1]:
                print(f"using cached {cached}", file=sys.stderr)
                archive_path, used = cached, url
                break
            print(f"cached {cached} does not match its {expected[0]}, downloading again", file=sys.stderr)
            _remove(cached)
        failures: list[DownloadError] = []
        for url in remote.urls if archive_path is None else ():
            if part_dir is not None:
                prefix, folder = f".{dest.name}.download-", part_dir
            else:
                prefix, folder = _tmp_prefix(dest, "download")
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=folder)
            os.close(fd)
            part = Path(name)
            try:
                actual = _fetch(url, part, timeout)
                if expected is not None and actual[expected[0]] != expected[1]:
                    raise _checksum_error(url, expected[0], expected[1], actual[expected[0]])
            except DownloadError as exc:
                _remove(part)
                part = None
                if not remote.what:
                    raise
                failures.append(exc)
                if url != remote.urls[-1]:
                    warn(f"{url}: {exc.reason}; trying the next known URL of {remote.what}")
                continue
            if cache_dir is not None:
                archive_path = cache_dir / _cache_name(url)
                os.replace(part, archive_path)
                part = None
            else:
                archive_path = part
            used = url
            break
        if archive_path is None:
            tried = "; ".join(f"{f.url} ({f.reason})" for f in failures)
            raise PipelineError(f"could not download {remote.what} from any known URL: {tried}. {remote.help}")
        try:
            yield archive_path, used
        except PipelineError:
            if expected is None and archive_path != part:
                _remove(archive_path)  # unverifiable cache entry is bad: fetch afresh next time
            raise
    finally:
        if part is not None:
            _remove(part)


FULL_HELP = (
    f"Download mvtec_anomaly_detection.tar.xz from the MVTec AD download page {DOWNLOAD_PAGE}, then set "
    "data.mvtec.url: file:///path/to/mvtec_anomaly_detection.tar.xz (with data.mvtec.archive: full), "
    "or unpack it and set data.source: folder with data.folder: /path/to/mvtec_anomaly_detection"
)
CATEGORY_HELP = (
    "The per-category links may be gone: set data.mvtec.archive: full (the whole dataset, tried at every "
    f"known URL), or download mvtec_anomaly_detection.tar.xz from the MVTec AD download page {DOWNLOAD_PAGE} "
    "and set data.mvtec.url: file:///path/to/mvtec_anomaly_detection.tar.xz with data.mvtec.archive: full, "
    "or unpack it and set data.source: folder with data.folder: /path/to/mvtec_anomaly_detection"
)


def _resolve_source(category: str, url: str | None, sha256: str | None, archive: str) -> Remote:
    """The URLs to try and the (algorithm, hex digest) they must match, None when nothing is known."""
    if archive not in ARCHIVES:
        raise PipelineError(f"params.yaml: data.mvtec.archive must be one of {', '.join(ARCHIVES)}, got '{archive}'")
    if not isinstance(category, str) or category in ("", ".", "..") or "/" in category or "\\" in category:
        raise PipelineError(f"data.categories: '{category}' is not a valid category name")
    if url is None and category not in CATEGORIES:
        raise PipelineError(
            f"data.categories: '{category}' is not an MVTec AD category "
            f"(one of {', '.join(CATEGORIES)}; or give data.mvtec.url)"
        )
    given = check_sha256(sha256, "data.mvtec.sha256")
    mine = ("sha256", given) if given else None
    if archive == "full":
        official = ("sha256", FULL_ARCHIVE_SHA256)
        if url is None:
            return Remote(tuple(FULL_ARCHIVE_URLS), mine or official, "the MVTec AD archive", FULL_HELP)
        return Remote((url,), mine or (official if url in FULL_ARCHIVE_URLS else None))
    official_url = CATEGORY_URLS.get(category)
    official = ("md5", CATEGORY_MD5.get(category))
    if url is None:
        return Remote((official_url,), mine or official, f"the MVTec AD archive of {category}", CATEGORY_HELP)
    chosen = url.replace(CATEGORY_PLACEHOLDER, category)
    return Remote((chosen,), mine or (official if chosen == official_url else None))


def download_category(
    category: str,
    dest: Path,
    url: str | None = None,
    sha256: str | None = None,
    archive: str = "full",
    cache_dir: Path | None = None,
    timeout: float = 60,
) -> Path:
    """Download an MVTec AD archive, verify it, and install only `category` at `dest`.

    archive="full" fetches the whole dataset, trying FULL_ARCHIVE_URLS in order, each answer checked
    against FULL_ARCHIVE_SHA256, and extracts just the one category; archive="category" fetches
    CATEGORY_URLS[category], checked against its published MD5. A given `url` is the only one tried
    (it may hold "{category}"), checked against `sha256` when given. With `cache_dir`, the verified
    archive is kept there and reused by later calls: the full one is fetched once for every
    category. Returns dest.
    """
    dest = Path(dest)
    remote = _resolve_source(category, url, sha256, archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fetched(remote, dest, cache_dir, timeout) as (archive_path, used):
        staging = _sibling_tmpdir(dest, "tmp")
        try:
            _extract_category(archive_path, category, staging, used)
            check_layout(staging, f"{used}: {category}")
            install_dir(staging, dest)
            staging = None
        finally:
            if staging is not None:
                _remove(staging)
    return dest


# -------------------------------------------------------------------------------------- folder


def copy_folder(source: Path, dest: Path) -> Path:
    """The `folder` source: copy an existing MVTec-layout category folder to `dest` (source untouched)."""
    source, dest = Path(source), Path(dest)
    validate_layout(source)
    src_real, dest_real = source.resolve(), dest.resolve()
    if dest_real == src_real or src_real in dest_real.parents or dest_real in src_real.parents:
        raise PipelineError(f"{source}: source folder and destination {dest} overlap")
    staging = _sibling_tmpdir(dest, "tmp")
    try:
        target = staging / "copy"
        try:
            shutil.copytree(source, target, symlinks=False)
        except (shutil.Error, OSError) as exc:
            raise PipelineError(f"{source}: could not copy to {dest} ({_reason(exc)[:300]})") from exc
        install_dir(target, dest)
    finally:
        _remove(staging)
    return dest
