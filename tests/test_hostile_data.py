"""Data sources that travel: archives (MVTec AD, VisA) and a user's folder. Sizes are bounded before they
reach the disk, collisions and links are one line each, a killed download leaves nothing for good, and
the folder source copies only the images and masks it decoded, never what a link outside points at."""
from __future__ import annotations

import http.server
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.data import archives, mvtec, visa
from stages.data.archives import Limits, extract_members
from stages.data.folder import copy_folder
from tests.conftest import REPO
from tests.test_download import leftovers, make_category, pack, sha, tree
from tests.test_visa import build_archive

# ------------------------------------------------------------------------------------------- archives


def test_a_sparse_member_is_refused_before_it_is_written(tmp_path):
    """A 25 kB archive holding a 2 GiB GNU sparse member wrote 2 GiB to data/raw (rc 0)."""
    root = make_category(tmp_path / "src" / "carpet")
    with open(root / "train/good/sparse.png", "wb") as fh:
        fh.truncate(2 * 2**30)  # all hole: no disk used
    archive = tmp_path / "sparse.tar.xz"
    subprocess.run(["tar", "--sparse", "-cJf", str(archive), "-C", str(tmp_path / "src"), "carpet"], check=True)
    assert archive.stat().st_size < 100_000
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"member 'carpet/train/good/sparse\.png' is a sparse file "
                                            r"\(2,147,483,648 bytes once expanded\)"):
        mvtec.download_category("carpet", out / "carpet", url=archive.as_uri(), sha256=sha(archive))
    assert leftovers(out) == []


def test_a_member_larger_than_any_image_is_refused(tmp_path):
    source = make_category(tmp_path / "src" / "carpet")
    (source / "train/good/huge.png").write_bytes(bytes(5000))
    archive = pack(tmp_path / "big.tar.xz", {"carpet": source})
    limits = Limits(total=10**9, param="data.mvtec.max_gb", member=4096)
    with pytest.raises(PipelineError, match=r"member 'carpet/train/good/huge\.png' is 5,000 bytes, more than any "
                                            r"usable image \(4,096, stages/data/archives\.py MAX_MEMBER_BYTES\)"):
        extract_members(archive, tmp_path / "into", "file://big", lambda parts: parts, limits)
    assert archives.MAX_MEMBER_BYTES > 64 * 2**20 * 6  # the largest image preprocess accepts, as 16-bit RGB


def test_what_an_archive_unpacks_to_is_bounded_by_the_param(tmp_path):
    """The whole decompressed stream counts, members skipped or not: zeros compress 1000:1."""
    source = make_category(tmp_path / "src" / "carpet")
    (source / "train/good/zeros.png").write_bytes(bytes(3_000_000))
    archive = pack(tmp_path / "zeros.tar.xz", {"carpet": source})
    assert archive.stat().st_size < 10_000
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"unpacks to more than 0\.001 GB, more than the dataset itself; refused "
                                            r"\(raise data\.mvtec\.max_gb for a larger archive\)"):
        mvtec.download_category("carpet", out / "carpet", url=archive.as_uri(), max_gb=0.001)
    assert leftovers(out) == []
    mvtec.download_category("carpet", out / "carpet", url=archive.as_uri(), max_gb=0.01)  # raised: it fits


class Endless(http.server.BaseHTTPRequestHandler):
    """A mirror that never stops sending zeros (no Content-Length), or announces more than the limit."""

    def do_GET(self):
        self.send_response(200)
        if self.path == "/announced":
            self.send_header("Content-Length", str(10**12))
        self.end_headers()
        try:
            while True:
                self.wfile.write(bytes(65536))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def endless():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("where, reason", [("/stream", "sent more than the limit of 0.002 GB"),
                                           ("/announced", "announces 1,000,000,000,000 bytes, more than the limit")])
def test_an_endless_download_stops_at_the_limit(tmp_path, endless, where, reason):
    """`file:///dev/zero` as a mirror streamed 2.37 GB in 8 s before its checksum could be compared."""
    out = tmp_path / "out"
    out.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(PipelineError, match=rf"{reason}.*raise data\.visa\.max_gb for a larger archive"):
        visa.download_category("candle", out / "candle", url=endless + where, sha256="0" * 64, cache_dir=cache,
                               max_gb=0.002)
    assert leftovers(out) == [] and leftovers(cache, keep=(archives.RECORDS,)) == []


def test_dev_zero_as_a_mirror_is_refused_unread(tmp_path):
    """A file:// archive is read where it is: a device is refused before a byte of it is read, a file over
    the limit by its size."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError, match=r"file:///dev/zero: /dev/zero is not a regular file"):
        mvtec.download_category("carpet", out / "carpet", url="file:///dev/zero", sha256="0" * 64, max_gb=0.001)
    big = tmp_path / "big.tar.xz"
    with open(big, "wb") as fh:
        fh.truncate(2_000_000)  # sparse: 2 MB by its size, nothing on disk
    with pytest.raises(PipelineError, match=r"is 2,000,000 bytes, more than the limit of 0\.001 GB \(raise "
                                            r"data\.mvtec\.max_gb for a larger archive\)"):
        mvtec.download_category("carpet", out / "carpet", url=big.as_uri(), sha256="0" * 64, max_gb=0.001)
    assert leftovers(out) == []


def collision_archive(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("members, named", [
    ([("carpet/train", b"a file"), ("carpet/train/good/000.png", b"x")], "carpet/train/good/000.png"),
    ([("carpet/x.png", None), ("carpet/x.png", b"x")], "carpet/x.png"),
    ([("carpet/x.png", b"x"), ("carpet/x.png", None)], "carpet/x.png"),
])
def test_a_file_where_a_folder_belongs_is_one_line(tmp_path, members, named):
    """These gave NotADirectoryError / IsADirectoryError tracebacks."""
    archive = collision_archive(tmp_path / "clash.tar.xz", members)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError, match=rf"member '{named}' collides with another of the same path \(a file "
                                            r"where the archive also has a folder, or the reverse\)"):
        mvtec.download_category("carpet", out / "carpet", url=archive.as_uri())
    assert leftovers(out) == []


def test_each_dropped_link_is_said_in_one_line(tmp_path, capsys):
    source = make_category(tmp_path / "src" / "carpet")
    archive = tmp_path / "links.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(source, arcname="carpet")
        for name, kind, target in [("carpet/train/good/evil.png", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("carpet/train/good/hard.png", tarfile.LNKTYPE, "../../etc/shadow"),
                                   ("carpet/test/good/dev.png", tarfile.CHRTYPE, "")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    dest = mvtec.download_category("carpet", tmp_path / "out" / "carpet", url=archive.as_uri())
    assert tree(dest) == tree(source)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {archive.as_uri()}: link member 'carpet/train/good/evil.png' -> '/etc/passwd' skipped (links "
        "and special files are never extracted)",
        f"warning: {archive.as_uri()}: link member 'carpet/train/good/hard.png' -> '../../etc/shadow' skipped "
        "(links and special files are never extracted)",
        f"warning: {archive.as_uri()}: special file member 'carpet/test/good/dev.png' skipped (links and special "
        "files are never extracted)",
    ]


SLOW_SERVER = """
import http.server, sys, time
class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(bytes(2**20))
        self.wfile.flush()
        time.sleep(600)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Slow)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

DOWNLOAD = """
import sys
from pathlib import Path
from stages.data import mvtec
mvtec.download_category("carpet", Path(sys.argv[1]), url=sys.argv[2], sha256="0" * 64, cache_dir=Path(sys.argv[3]))
"""


def test_a_killed_download_leaves_its_part_file_only_until_the_next_download(tmp_path):
    """SIGTERM during a download (a CI timeout) left a 1 GB .part in data/downloads/ for good."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE, text=True)
    cache, out = tmp_path / "cache", tmp_path / "out"
    try:
        port = int(server.stdout.readline())
        download = subprocess.Popen([sys.executable, "-c", DOWNLOAD, str(out / "carpet"),
                                     f"http://127.0.0.1:{port}/mvtec.tar.xz", str(cache)], env=env)
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 2**20 for p in cache.glob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.1)
        download.send_signal(signal.SIGTERM)
        download.wait(30)
    finally:
        server.kill()
        server.wait()
    parts = list(cache.glob("*.part"))
    assert len(parts) == 1 and f".download-{download.pid}-" in parts[0].name  # killed: no cleanup ran
    archive = pack(tmp_path / "ok.tar.xz", {"carpet": make_category(tmp_path / "src" / "carpet")})
    mvtec.download_category("carpet", out / "carpet", url=archive.as_uri(), cache_dir=cache)
    assert list(cache.glob("*.part")) == []


def test_a_live_downloads_part_file_is_left_alone(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = cache / f".carpet.dataset.download-{os.getpid()}-abc.part"  # this process is alive
    mine.write_bytes(b"x")
    archive = pack(tmp_path / "ok.tar.xz", {"carpet": make_category(tmp_path / "src" / "carpet")})
    mvtec.download_category("carpet", tmp_path / "out" / "carpet", url=archive.as_uri(), cache_dir=cache)
    assert mine.exists()


def palette_png(width: int, height: int) -> bytes:
    """A 1-bit palette PNG of zeros, written row by row (never held whole in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\x00" + bytes((width + 7) // 8), zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", bytes(6)) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def test_a_visa_mask_bomb_is_one_line(tmp_path):
    """A 30000 x 30000 palette mask (under 1 MB) gave a DecompressionBombError traceback."""
    bomb = palette_png(30000, 30000)
    assert len(bomb) < 2_000_000
    archive = tmp_path / "visa.tar"
    build_archive(archive, extra_members={"candle/Data/Masks/Anomaly/000.png": bomb})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError) as caught:
        visa.download_category("candle", out / "candle", url=archive.as_uri())
    message = str(caught.value)
    assert message.startswith(f"{archive.as_uri()}: split_csv/1cls.csv line ")
    assert ": mask candle/Data/Masks/" in message
    assert message.count("split_csv/1cls.csv line") == 1  # the prefix once (it was twice)
    assert "(900000000 pixels) exceeds limit" in message  # Pillow's bound, met before decoding (raw.py _open)
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------- folder source


def test_the_folder_source_copies_only_its_images_and_masks(tmp_path):
    """A `notes.txt` linked to /dev/zero filled .tmp at 560 MB/s; a linked folder copied 229 MB of models."""
    source = make_category(tmp_path / "user" / "carpet")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models").mkdir(parents=True)
    (elsewhere / "models" / "big.bin").write_bytes(bytes(1000))
    os.symlink("/dev/zero", source / "notes.txt")
    os.symlink("/dev/zero", source / "train/good/zero.png")
    os.symlink(elsewhere / "models", source / "ground_truth" / "extra")
    os.symlink(source / "train/good/000.png", source / "test/good/same_as_train.png")  # inside: fine
    (source / "README.md").write_text("not an image\n")
    begin = time.monotonic()
    dest = copy_folder(source, tmp_path / "out" / "carpet")
    assert time.monotonic() - begin < 30
    assert sorted(tree(dest)) == ["ground_truth/cut/000_mask.png", "test/cut/000.png", "test/good/000.png",
                                  "test/good/same_as_train.png", "train/good/000.png", "train/good/001.png"]
    assert not (dest / "test/good/same_as_train.png").is_symlink()  # a copy of the bytes, not the link
    assert tree(dest)["test/good/same_as_train.png"] == (source / "train/good/000.png").read_bytes()


@pytest.mark.parametrize("where", ["train/good/outside.png", "test/cut/000.png", "ground_truth/cut/000_mask.png"])
def test_a_link_that_leaves_the_category_folder_is_refused_before_it_is_read(tmp_path, monkeypatch, where):
    source = make_category(tmp_path / "user" / "carpet")
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    (source / where).unlink(missing_ok=True)
    os.symlink(outside, source / where)
    from stages.data import raw

    monkeypatch.setattr(raw, "read_image", lambda *a: pytest.fail("an image was decoded before the link check"))
    with pytest.raises(PipelineError, match=rf"{source / where}: a link to a file outside the category folder"):
        copy_folder(source, tmp_path / "out" / "carpet")
    assert not (tmp_path / "out" / "carpet").exists()


def test_the_download_stage_refuses_a_linked_folder_source(tmp_path):
    from tests.conftest import default_params, error_line, run_stage, write_params

    source = make_category(tmp_path / "user" / "carpet")
    os.symlink("/etc/passwd", source / "train/good/passwd.png")
    params = default_params()
    params["data"].update(source="folder", folder=str(tmp_path / "user"))
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, params)
    line = error_line(run_stage("download", "carpet", cwd=project))
    assert line == (f"error: {source}/train/good/passwd.png: a link to a file outside the category folder {source}; "
                    "copy the file into the folder instead (the folder source reads nothing outside it)")
