"""Offline tests for stages/data/mvtec.py: file:// and localhost HTTP downloads, no internet."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.data import archives, mvtec
from stages.data.folder import copy_folder
from stages.data.raw import check_layout
from tests.conftest import call_stage, default_params, error_line, run_stage, write_params

# ----------------------------------------------------------------------------------- fixtures


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def make_category(root: Path, seed: int = 0) -> Path:
    """A tiny MVTec-layout category folder."""
    _png(root / "train/good/000.png", 10 + seed)
    _png(root / "train/good/001.png", 20 + seed)
    _png(root / "test/good/000.png", 30 + seed)
    _png(root / "test/cut/000.png", 40 + seed)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 2:5] = 255
    (root / "ground_truth/cut").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(root / "ground_truth/cut/000_mask.png")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pack(archive: Path, entries: dict[str, Path]) -> Path:
    """Write a .tar.xz with each folder in `entries` stored under its arcname."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        for arcname, folder in entries.items():
            tar.add(folder, arcname=arcname)
    return archive


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path) -> Path:
    return make_category(tmp_path / "src" / "carpet")


@pytest.fixture
def carpet_archive(tmp_path, source) -> Path:
    return pack(tmp_path / "serve" / "carpet.tar.xz", {"carpet": source})


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty parent folder for dest, so leftovers are easy to spot."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/serve on localhost; yields the base URL."""
    root = tmp_path / "serve"
    root.mkdir(exist_ok=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def serve(files: dict[str, bytes]):
    """A localhost HTTP server answering GET `path` with files[path], 404 otherwise.

    Yields (base URL, the paths requested so far), so a test can see which URLs were tried.
    """
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def full_archive(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A small mvtec_anomaly_detection.tar.xz in the official layout (top folder, readme, categories)."""
    sources = {name: make_category(tmp_path / "full-src" / name, seed=i * 10)
               for i, name in enumerate(("carpet", "grid"))}
    readme = tmp_path / "full-src" / "readme.txt"
    readme.write_text("license\n")
    archive = tmp_path / "full" / "mvtec_anomaly_detection.tar.xz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(readme, arcname="mvtec_anomaly_detection/readme.txt")
        for name, folder in sources.items():
            tar.add(folder, arcname=f"mvtec_anomaly_detection/{name}")
    return archive, sources


def leftovers(folder: Path, keep: tuple[str, ...] = ()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ----------------------------------------------------------------------------------- download


def test_file_url_with_sha256(carpet_archive, source, out):
    dest = out / "carpet"
    result = mvtec.download_category("carpet", dest, url=carpet_archive.as_uri(), sha256=sha(carpet_archive))
    assert result == dest
    assert tree(dest) == tree(source)
    assert "ground_truth/cut/000_mask.png" in tree(dest)
    assert leftovers(out) == ["carpet"]


def test_http_download(carpet_archive, source, out, http_root):
    dest = out / "carpet"
    mvtec.download_category("carpet", dest, url=f"{http_root}/carpet.tar.xz", timeout=10)
    assert tree(dest) == tree(source)
    assert leftovers(out) == ["carpet"]


def test_http_404_names_url(out, http_root):
    url = f"{http_root}/missing.tar.xz"
    with pytest.raises(PipelineError, match=r"could not download .*missing\.tar\.xz: HTTP 404") as info:
        mvtec.download_category("carpet", out / "carpet", url=url, timeout=10)
    assert "\n" not in str(info.value)
    assert leftovers(out) == []


def test_missing_file_url(tmp_path, out):
    url = (tmp_path / "nope.tar.xz").as_uri()
    with pytest.raises(PipelineError, match="could not download"):
        mvtec.download_category("carpet", out / "carpet", url=url)
    assert leftovers(out) == []


def test_full_layout_extracts_only_category(tmp_path, source, out):
    wood = make_category(tmp_path / "src2" / "wood", seed=5)
    grid = make_category(tmp_path / "src3" / "grid", seed=7)
    readme = tmp_path / "readme.txt"
    readme.write_text("license\n")
    archive = tmp_path / "serve" / "mvtec_anomaly_detection.tar.xz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(readme, arcname="mvtec_anomaly_detection/readme.txt")
        tar.add(wood, arcname="mvtec_anomaly_detection/wood")
        tar.add(source, arcname="mvtec_anomaly_detection/carpet")
        tar.add(grid, arcname="mvtec_anomaly_detection/grid")
    dest = out / "carpet"
    mvtec.download_category("carpet", dest, url=archive.as_uri(), sha256=sha(archive), archive="full")
    assert tree(dest) == tree(source)
    assert leftovers(out) == ["carpet"]


def test_dot_slash_members(tmp_path, source, out):
    archive = pack(tmp_path / "dot.tar.xz", {"./carpet": source})
    dest = mvtec.download_category("carpet", out / "carpet", url=archive.as_uri())
    assert tree(dest) == tree(source)


def test_checksum_mismatch_leaves_nothing(carpet_archive, out):
    dest = out / "carpet"
    with pytest.raises(PipelineError, match="sha256|checksum") as info:
        mvtec.download_category("carpet", dest, url=carpet_archive.as_uri(), sha256="0" * 64)
    message = str(info.value)
    assert carpet_archive.as_uri() in message and "0" * 64 in message and sha(carpet_archive) in message
    assert not dest.exists()
    assert leftovers(out) == []


def test_truncated_archive_leaves_nothing(tmp_path, carpet_archive, out):
    data = carpet_archive.read_bytes()
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(data[: len(data) // 2])
    dest = out / "carpet"
    with pytest.raises(PipelineError, match="truncated or corrupt") as info:
        mvtec.download_category("carpet", dest, url=truncated.as_uri())
    assert truncated.as_uri() in str(info.value)
    assert not dest.exists()
    assert leftovers(out) == []


def test_tail_truncation_detected(tmp_path, carpet_archive, out):
    """Cut only in the trailing padding: every member is intact but the xz stream is incomplete."""
    data = carpet_archive.read_bytes()
    truncated = tmp_path / "tail.tar.xz"
    truncated.write_bytes(data[:-40])
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        mvtec.download_category("carpet", out / "carpet", url=truncated.as_uri())
    assert leftovers(out) == []


def test_interrupt_leaves_nothing(monkeypatch, tmp_path, carpet_archive, out, http_root):
    real_fetch = archives._fetch

    def fetch_then_interrupt(url, target, timeout, *limits):
        real_fetch(url, target, timeout, *limits)
        raise KeyboardInterrupt

    monkeypatch.setattr(archives, "_fetch", fetch_then_interrupt)
    cache = tmp_path / "cache"
    for cache_dir in (None, cache):
        with pytest.raises(KeyboardInterrupt):
            mvtec.download_category("carpet", out / "carpet", url=f"{http_root}/carpet.tar.xz", cache_dir=cache_dir)
    assert leftovers(out) == [] and leftovers(cache, keep=(archives.RECORDS,)) == []  # no partial download


def test_not_an_archive(tmp_path, out):
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(b"<html>not found</html>")
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        mvtec.download_category("carpet", out / "carpet", url=junk.as_uri())
    assert leftovers(out) == []


def test_category_missing_from_archive(carpet_archive, out):
    with pytest.raises(PipelineError, match="no 'wood/' folder"):
        mvtec.download_category("wood", out / "wood", url=carpet_archive.as_uri())
    assert leftovers(out) == []


def test_bad_layout_in_archive(tmp_path, out):
    bad = tmp_path / "bad" / "carpet"
    (bad / "train" / "good").mkdir(parents=True)
    _png(bad / "test/good/000.png", 1)
    archive = pack(tmp_path / "bad.tar.xz", {"carpet": bad})
    with pytest.raises(PipelineError, match="train/good: no training images"):
        mvtec.download_category("carpet", out / "carpet", url=archive.as_uri())
    assert leftovers(out) == []


def test_failed_download_keeps_existing_dest(tmp_path, carpet_archive, source, out):
    dest = out / "carpet"
    mvtec.download_category("carpet", dest, url=carpet_archive.as_uri())
    before = tree(dest)
    data = carpet_archive.read_bytes()
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError):
        mvtec.download_category("carpet", dest, url=truncated.as_uri())
    with pytest.raises(PipelineError):
        mvtec.download_category("carpet", dest, url=carpet_archive.as_uri(), sha256="f" * 64)
    assert tree(dest) == before == tree(source)
    assert leftovers(out) == ["carpet"]


def test_redownload_replaces_dest(tmp_path, carpet_archive, out):
    dest = out / "carpet"
    mvtec.download_category("carpet", dest, url=carpet_archive.as_uri())
    (dest / "stale.txt").write_text("old")
    other = make_category(tmp_path / "other" / "carpet", seed=50)
    archive = pack(tmp_path / "other.tar.xz", {"carpet": other})
    mvtec.download_category("carpet", dest, url=archive.as_uri())
    assert tree(dest) == tree(other)
    assert leftovers(out) == ["carpet"]


def test_unsafe_member_rejected(tmp_path, source, out):
    archive = tmp_path / "evil.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(source, arcname="carpet")
        info = tarfile.TarInfo("carpet/../../escape.txt")
        payload = b"gotcha"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(PipelineError, match="unsafe member"):
        mvtec.download_category("carpet", out / "carpet", url=archive.as_uri())
    assert leftovers(out) == []
    assert not (tmp_path / "escape.txt").exists()


def test_links_are_skipped(tmp_path, source, out):
    archive = tmp_path / "links.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(source, arcname="carpet")
        link = tarfile.TarInfo("carpet/train/good/link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    dest = mvtec.download_category("carpet", out / "carpet", url=archive.as_uri())
    assert not (dest / "train/good/link.png").exists() and not (dest / "train/good/link.png").is_symlink()
    assert tree(dest) == tree(source)


def hashed(monkeypatch) -> list[str]:
    """The names of the files archives.py reads through to hash them, in order."""
    calls, real = [], archives._hash_file

    def spy(path, size):
        calls.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(archives, "_hash_file", spy)
    return calls


def test_cache_dir_keeps_and_reuses_archive(monkeypatch, tmp_path, carpet_archive, source, out, http_root):
    """Downloaded once, hashed while it streams in, then reused with its recorded checksum: never read
    through again, and not needed at its URL any more."""
    reads = hashed(monkeypatch)
    cache = tmp_path / "cache"
    url = f"{http_root}/carpet.tar.xz"
    digest = sha(carpet_archive)
    mvtec.download_category("carpet", out / "a", url=url, sha256=digest, cache_dir=cache)
    assert leftovers(cache) == [archives.RECORDS, archives._cache_name(url)]
    carpet_archive.unlink()  # a second call must not need the source any more
    mvtec.download_category("carpet", out / "b", url=url, sha256=digest, cache_dir=cache)
    assert tree(out / "b") == tree(source)
    assert leftovers(out) == ["a", "b"]
    assert reads == []  # the download's own digest was recorded and read back
    # a cached archive changed on disk is hashed again, found wrong, and fetched afresh (here: gone)
    (cache / archives._cache_name(url)).write_bytes(b"not the archive")
    with pytest.raises(PipelineError, match="HTTP 404"):
        mvtec.download_category("carpet", out / "c", url=url, sha256=digest, cache_dir=cache)
    assert reads == [archives._cache_name(url)] and leftovers(cache, keep=(archives.RECORDS,)) == []


def test_cache_dir_no_leftovers_on_mismatch(tmp_path, carpet_archive, out, http_root):
    cache = tmp_path / "cache"
    url = f"{http_root}/carpet.tar.xz"
    with pytest.raises(PipelineError, match="checksum"):
        mvtec.download_category("carpet", out / "carpet", url=url, sha256="a" * 64, cache_dir=cache)
    assert leftovers(cache, keep=(archives.RECORDS,)) == [] and leftovers(out) == []


def test_file_url_is_read_in_place_and_hashed_once(monkeypatch, tmp_path, out):
    """A local archive is never copied: each category reads it where it is, and its checksum is computed
    once (recorded in the cache), until the file changes."""
    archive, sources = full_archive(tmp_path)
    reads = hashed(monkeypatch)
    cache = tmp_path / "cache"
    url, digest = archive.as_uri(), sha(archive)
    for name in ("carpet", "grid"):
        mvtec.download_category(name, out / name, url=url, sha256=digest, cache_dir=cache)
        assert tree(out / name) == tree(sources[name])
    assert reads == ["mvtec_anomaly_detection.tar.xz"]  # the second category read the record
    assert leftovers(cache) == [archives.RECORDS]  # no copy of the archive
    assert archive.stat().st_size > 0 and sha(archive) == digest  # the user's file is as it was
    # a wrong checksum is still refused (the record holds the file's digest, not a verdict)
    with pytest.raises(PipelineError, match="checksum mismatch"):
        mvtec.download_category("carpet", out / "again", url=url, sha256="c" * 64, cache_dir=cache)
    assert reads == ["mvtec_anomaly_detection.tar.xz"] and archive.is_file()
    # the file replaced by other bytes: read through again, and refused
    other = pack(tmp_path / "other.tar.xz", {"carpet": sources["grid"]})
    other.replace(archive)
    with pytest.raises(PipelineError, match="checksum mismatch"):
        mvtec.download_category("carpet", out / "again", url=url, sha256=digest, cache_dir=cache)
    assert reads == ["mvtec_anomaly_detection.tar.xz"] * 2 and leftovers(out) == ["carpet", "grid"]


def unpacked_mvtec(tmp_path: Path, monkeypatch) -> tuple[Path, dict[str, Path]]:
    """mvtec_anomaly_detection/ unpacked, two small categories (their counts made the official ones)."""
    root = tmp_path / "mvtec_anomaly_detection"
    sources = {name: make_category(root / name, seed=i) for i, name in enumerate(("carpet", "grid"))}
    (root / "readme.txt").write_text("license\n")
    monkeypatch.setattr(mvtec, "EXPECTED_COUNTS", {"carpet": (2, 1, 1), "grid": (2, 1, 1)})
    return root, sources


def test_unpacked_folder_is_read_in_place(monkeypatch, tmp_path, out):
    root, sources = unpacked_mvtec(tmp_path, monkeypatch)
    before = tree(root)
    cache = tmp_path / "cache"
    for name in ("carpet", "grid"):
        mvtec.download_category(name, out / name, url=root.as_uri(), cache_dir=cache)
        assert tree(out / name) == tree(sources[name])
    assert tree(root) == before  # read, never changed
    assert not cache.exists()  # no archive, nothing to record


def test_unpacked_folder_missing_a_category_is_one_line(monkeypatch, tmp_path, out):
    root, _ = unpacked_mvtec(tmp_path, monkeypatch)
    with pytest.raises(PipelineError) as info:
        mvtec.download_category("screw", out / "screw", url=root.as_uri())
    assert str(info.value) == (f"data.mvtec.url: {root} has no 'screw' folder (an unpacked MVTec AD holds one "
                               "folder per category; found: carpet, grid)")
    assert leftovers(out) == []


def test_unpacked_folder_with_other_counts_is_refused(monkeypatch, tmp_path, out):
    """An unpacked copy must hold the official image counts: a missing image is named, nothing written."""
    root, _ = unpacked_mvtec(tmp_path, monkeypatch)
    (root / "carpet/train/good/001.png").unlink()
    with pytest.raises(PipelineError) as info:
        mvtec.download_category("carpet", out / "carpet", url=root.as_uri())
    assert str(info.value) == (f"{root / 'carpet'}: 1 / 1 / 1 images (train good / test good / test defective), "
                               "MVTec AD's carpet has 2 / 1 / 1: an incomplete or altered copy")
    assert leftovers(out) == []


def test_official_counts_table():
    """Bergmann et al. 2019, Table 1: 3,629 training and 1,725 test images over the 15 categories."""
    assert tuple(mvtec.EXPECTED_COUNTS) == mvtec.CATEGORIES
    assert sum(c[0] for c in mvtec.EXPECTED_COUNTS.values()) == 3629
    assert sum(c[1] + c[2] for c in mvtec.EXPECTED_COUNTS.values()) == 1725
    assert mvtec.EXPECTED_COUNTS["hazelnut"] == (391, 40, 70) and mvtec.EXPECTED_COUNTS["toothbrush"] == (60, 12, 30)


# ------------------------------------------------------------------------------------- params


def test_unknown_category_names_param(out):
    with pytest.raises(PipelineError, match=r"data\.categories: 'spaceship' is not an MVTec AD category"):
        mvtec.download_category("spaceship", out / "spaceship")
    assert leftovers(out) == []


def test_unknown_archive_names_param(out):
    with pytest.raises(PipelineError, match=r"data\.mvtec\.archive"):
        mvtec.download_category("carpet", out / "carpet", archive="zip")


def test_urls_table():
    assert len(mvtec.CATEGORIES) == 15 and set(mvtec.CATEGORY_URLS) == set(mvtec.CATEGORIES)
    assert mvtec.CATEGORY_URLS["carpet"] == f"{mvtec.BASE_URL}/420937484-1629951672/carpet.tar.xz"
    for category, url in mvtec.CATEGORY_URLS.items():
        assert url.startswith(mvtec.BASE_URL + "/") and url.endswith(f"/{category}.tar.xz")
    assert mvtec.FULL_ARCHIVE_URLS == (  # the published link first, the older shares as fallbacks
        "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
        "mvtec_anomaly_detection.tar.xz",
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/download/420938113-1629960298/"
        "mvtec_anomaly_detection.tar.xz",
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
        "mvtec_anomaly_detection.tar.xz",
    )
    assert mvtec.FULL_ARCHIVE_SHA256 == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"


@pytest.fixture
def fetched_urls(monkeypatch) -> list[str]:
    """No network: every fetch 'downloads' one byte whose digests match no published checksum."""
    seen = []

    def fake_fetch(url, target, timeout, limits=None):
        seen.append(url)
        target.write_bytes(b"x")
        return {"sha256": "b" * 64, "md5": "c" * 32}

    monkeypatch.setattr(archives, "_fetch", fake_fetch)
    return seen


def test_full_archive_defaults(fetched_urls, out):
    """The default (archive full, no url/sha256) tries every known URL, each checked against
    FULL_ARCHIVE_SHA256: a wrong answer is a failure of that URL, not of the download."""
    with pytest.raises(PipelineError) as info:
        mvtec.download_category("carpet", out / "carpet")
    assert fetched_urls == list(mvtec.FULL_ARCHIVE_URLS)
    message = str(info.value)
    assert "\n" not in message
    for url in mvtec.FULL_ARCHIVE_URLS:
        assert f"{url} (sha256 checksum mismatch (expected {mvtec.FULL_ARCHIVE_SHA256}, got {'b' * 64}))" in message
    assert leftovers(out) == []


def test_full_archive_falls_back_to_the_next_url(monkeypatch, tmp_path, out, capsys):
    """A 404 and then a 200 with the wrong bytes are both failures; the third URL's verified archive is used."""
    archive, sources = full_archive(tmp_path)
    wrong = pack(tmp_path / "wrong.tar.xz", {"carpet": make_category(tmp_path / "wrong" / "carpet", seed=99)})
    files = {
        "/moved/mvtec_anomaly_detection.tar.xz": wrong.read_bytes(),
        "/current/mvtec_anomaly_detection.tar.xz": archive.read_bytes(),
    }
    with serve(files) as (base, requested):
        urls = tuple(f"{base}/{folder}/mvtec_anomaly_detection.tar.xz" for folder in ("gone", "moved", "current"))
        monkeypatch.setattr(mvtec, "FULL_ARCHIVE_URLS", urls)
        monkeypatch.setattr(mvtec, "FULL_ARCHIVE_SHA256", sha(archive))
        cache = tmp_path / "cache"
        mvtec.download_category("carpet", out / "carpet", cache_dir=cache, timeout=10)
        assert requested == [
            "/gone/mvtec_anomaly_detection.tar.xz",
            "/moved/mvtec_anomaly_detection.tar.xz",
            "/current/mvtec_anomaly_detection.tar.xz",
        ]
        assert tree(out / "carpet") == tree(sources["carpet"])  # the verified archive's carpet, not the wrong one's
        warnings = capsys.readouterr().err
        assert f"warning: {urls[0]}: HTTP 404 Not Found; trying the next known URL" in warnings
        assert f"warning: {urls[1]}: sha256 checksum mismatch" in warnings
        assert leftovers(cache, keep=(archives.RECORDS,)) == [archives._cache_name(urls[2])]  # the verified one
        mvtec.download_category("grid", out / "grid", cache_dir=cache, timeout=10)
        assert len(requested) == 3  # every category after the first comes from the cache
    assert tree(out / "grid") == tree(sources["grid"])
    assert leftovers(out) == ["carpet", "grid"]


def test_full_archive_all_urls_fail_in_one_line(monkeypatch, tmp_path, out):
    """Every known URL 404s: one line with each URL and its status, the download page and both ways out."""
    with serve({}) as (base, requested):
        urls = tuple(f"{base}/share{i}/mvtec_anomaly_detection.tar.xz" for i in range(3))
        monkeypatch.setattr(mvtec, "FULL_ARCHIVE_URLS", urls)
        cache = tmp_path / "cache"
        with pytest.raises(PipelineError) as info:
            mvtec.download_category("carpet", out / "carpet", cache_dir=cache, timeout=10)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not download the MVTec AD archive from any known URL: ")
    assert "; ".join(f"{url} (HTTP 404 Not Found)" for url in urls) in message
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in message
    assert "data.mvtec.url: file:///path/to/mvtec_anomaly_detection.tar.xz" in message
    assert "data.source: folder" in message
    assert len(requested) == 3
    assert leftovers(out) == [] and leftovers(cache, keep=(archives.RECORDS,)) == []


def test_per_category_archive_failure_points_to_the_full_one(monkeypatch, out):
    """archive: category stays an option; its (possibly dead) link's failure says what to do instead."""
    with serve({}) as (base, _):
        monkeypatch.setitem(mvtec.CATEGORY_URLS, "carpet", f"{base}/carpet.tar.xz")
        with pytest.raises(PipelineError) as info:
            mvtec.download_category("carpet", out / "carpet", archive="category", timeout=10)
    message = str(info.value)
    assert f"{base}/carpet.tar.xz (HTTP 404 Not Found)" in message and "\n" not in message
    assert "data.mvtec.archive: full" in message and mvtec.DOWNLOAD_PAGE in message
    assert leftovers(out) == []


def test_download_stage_defaults_to_the_full_archive_once(monkeypatch, tmp_path, user_cache):
    """`data.source: mvtec` with the default params (archive: full): both categories from one fetch
    of the full archive into the user cache (data.download_dir: null), nothing of it in the project."""
    archive, sources = full_archive(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    params = default_params()
    assert params["data"]["mvtec"]["archive"] == "full" and params["data"]["mvtec"]["url"] is None
    params["data"].update(source="mvtec", categories=["carpet", "grid"], mvtec={})  # the schema's defaults
    write_params(project, params)
    with serve({"/mvtec_anomaly_detection.tar.xz": archive.read_bytes()}) as (base, requested):
        monkeypatch.setattr(mvtec, "FULL_ARCHIVE_URLS", (f"{base}/mvtec_anomaly_detection.tar.xz",))
        monkeypatch.setattr(mvtec, "FULL_ARCHIVE_SHA256", sha(archive))
        call_stage("download", "carpet", cwd=project)
        call_stage("download", "grid", cwd=project)
    assert requested == ["/mvtec_anomaly_detection.tar.xz"]
    for name, source in sources.items():
        assert tree(project / f"data/raw/{name}.dataset") == tree(source)
    assert leftovers(user_cache / "anomaly-pipeline/downloads", keep=(archives.RECORDS,)) == [
        archives._cache_name(f"{base}/mvtec_anomaly_detection.tar.xz")
    ]
    assert sorted(p.name for p in project.iterdir()) == [".tmp", "data", "params.yaml"]
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw"]


def test_download_dir_that_cannot_be_written_is_one_line(tmp_path):
    """data.download_dir under a file (nothing can be created there, even as root): one line, nothing written."""
    project = tmp_path / "project"
    project.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    params = default_params()
    params["data"].update(source="mvtec", categories=["carpet"], download_dir=str(blocker / "downloads"))
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert line == (f"error: data.download_dir: cannot write to {blocker / 'downloads'} (Not a directory); set "
                    "data.download_dir to a folder you can write (null: the user cache)")
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"] and blocker.read_text() == ""


def test_relative_download_dir_is_refused(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    params = default_params()
    params["data"].update(source="mvtec", categories=["carpet"], download_dir="downloads")
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert "data.download_dir" in line and "an absolute path" in line and "queued experiment" in line
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]


PUBLISHED_MD5 = {  # as the issue lists them (open-source MVTec AD loaders)
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


@pytest.mark.parametrize("category", ["carpet", "grid", "zipper"])
def test_official_category_archive_is_checked_against_its_published_md5(fetched_urls, out, category):
    """Each official per-category URL is verified against that category's MD5; a wrong file is refused."""
    assert mvtec.CATEGORY_MD5 == PUBLISHED_MD5
    with pytest.raises(PipelineError, match=f"md5 checksum mismatch \\(expected {PUBLISHED_MD5[category]}, got c+\\)"):
        mvtec.download_category(category, out / category, archive="category")
    assert fetched_urls == [mvtec.CATEGORY_URLS[category]]
    assert leftovers(out) == []


def test_url_template_names_each_category(carpet_archive, out):
    """data.mvtec.url with {category}: one mirror line serves every category (here a file:// folder)."""
    mirror = carpet_archive.parent
    template = (mirror / "{category}.tar.xz").as_uri().replace("%7B", "{").replace("%7D", "}")
    mvtec.download_category("carpet", out / "carpet", url=template, archive="category")
    assert (out / "carpet" / "train" / "good").is_dir()
    with pytest.raises(PipelineError, match=r"grid\.tar\.xz"):
        mvtec.download_category("grid", out / "grid", url=template, archive="category")


# ------------------------------------------------------------------------------ layout + copy


def test_validate_layout_ok(source):
    check_layout(source)


def test_validate_layout_missing_folder(tmp_path):
    with pytest.raises(PipelineError, match="category folder not found"):
        check_layout(tmp_path / "nope")


def test_validate_layout_empty_train_good(tmp_path):
    root = tmp_path / "carpet"
    (root / "train" / "good").mkdir(parents=True)
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _png(root / "test/good/000.png", 1)
    with pytest.raises(PipelineError, match=r"train/good: no training images"):
        check_layout(root)


def test_validate_layout_needs_test_images(tmp_path):
    root = tmp_path / "carpet"
    _png(root / "train/good/000.PNG", 1)  # suffix check is case-insensitive
    with pytest.raises(PipelineError, match="test"):
        check_layout(root)
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(PipelineError, match="no test images"):
        check_layout(root)
    _png(root / "test/good/000.png", 2)
    check_layout(root)  # ground_truth/ is optional


def test_copy_folder(source, out):
    before = tree(source)
    dest = copy_folder(source, out / "carpet")
    assert dest == out / "carpet"
    assert tree(dest) == before
    assert tree(source) == before
    assert leftovers(out) == ["carpet"]


def test_copy_folder_replaces_and_rejects_bad(tmp_path, source, out):
    dest = out / "carpet"
    copy_folder(source, dest)
    (dest / "stale.txt").write_text("old")
    copy_folder(source, dest)
    assert tree(dest) == tree(source)
    with pytest.raises(PipelineError, match="category folder not found"):
        copy_folder(tmp_path / "missing", dest)
    with pytest.raises(PipelineError, match="overlap"):
        copy_folder(source, source)
    assert tree(dest) == tree(source)
    assert leftovers(out) == ["carpet"]
