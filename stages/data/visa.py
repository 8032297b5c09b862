"""Getting a VisA category onto disk in the project's MVTec layout (data.source: visa).

VisA (Zou et al. 2022, "SPot-the-Difference") is one uncompressed tar for its 12 categories:
<category>/Data/Images/{Normal,Anomaly}/*.JPG, <category>/Data/Masks/Anomaly/*.png (palette PNGs
whose indices 0..3 label the pixels, 0 = good) and split_csv/1cls.csv, the one-class split
(columns object,split,label,image,mask; paths relative to the archive root). The archive is fetched
and verified once into data.download_dir by stages/data/archives.py (or read where it is, from a
file:// URL, or unpacked: a file:// URL naming the folder); each download stage reads its category
from it and lays it out as preprocess expects: train/good (the csv's normal training images),
test/good, test/anomaly, ground_truth/anomaly/<stem>_mask.png. All-or-nothing like mvtec.py: a
failure leaves the destination as it was.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.core.errors import PipelineError
from stages.core.outputs import remove_path
from stages.data.archives import (
    Limits,
    Remote,
    check_sha256,
    extract_members,
    fetched,
    install_dir,
    local_folder,
    staging_dir,
)
from stages.data.folder import _copy_regular as copy_regular
from stages.data.raw import _open, check_layout, read_mask

CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

ARCHIVE_URL = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
ARCHIVE_SHA256 = "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
DOWNLOAD_PAGE = "https://github.com/amazon-science/spot-diff"
SPLIT_CSV = "split_csv/1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
DEFECT = "anomaly"  # VisA names no defect types: every defective test image goes to test/anomaly

# (train normal, test normal, test anomaly) of each category in the official 1cls.csv. Checked when
# the archive is verified against ARCHIVE_SHA256 (only then is it known to be the official one).
EXPECTED_COUNTS = {
    "candle": (900, 100, 100),
    "capsules": (542, 60, 100),
    "cashew": (450, 50, 100),
    "chewinggum": (453, 50, 100),
    "fryum": (450, 50, 100),
    "macaroni1": (900, 100, 100),
    "macaroni2": (900, 100, 100),
    "pcb1": (904, 100, 100),
    "pcb2": (901, 100, 100),
    "pcb3": (905, 101, 100),
    "pcb4": (904, 101, 100),
    "pipe_fryum": (450, 50, 100),
}

HELP = (
    f"Download VisA_20220922.tar (linked from {DOWNLOAD_PAGE}), then set "
    "data.visa.url: file:///path/to/VisA_20220922.tar (it is checked against the official SHA-256 "
    "when data.visa.sha256 is set to it)"
)


def _resolve_source(category: str, url: str | None, sha256: str | None) -> Remote:
    if not isinstance(category, str) or category in ("", ".", "..") or "/" in category or "\\" in category:
        raise PipelineError(f"data.categories: '{category}' is not a valid category name")
    if url is None and category not in CATEGORIES:
        raise PipelineError(f"data.categories: '{category}' is not a VisA category "
                            f"(one of {', '.join(CATEGORIES)}; or give data.visa.url)")
    given = check_sha256(sha256, "data.visa.sha256")
    official = ("sha256", ARCHIVE_SHA256)
    if url is None:
        return Remote((ARCHIVE_URL,), ("sha256", given) if given else official, "the VisA archive", HELP)
    return Remote((url,), ("sha256", given) if given else (official if url == ARCHIVE_URL else None))


def _path_parts(value: str) -> list[str] | None:
    """A csv path as components, None when it could leave the archive (absolute, '..')."""
    value = value.strip().replace("\\", "/")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if value.startswith("/") or ".." in parts or not parts:
        return None
    return parts


def _extract(archive: Path, category: str, into: Path, url: str, limits: Limits | None = None) -> Path:
    """Write split_csv/1cls.csv and the category's <category>/Data/ files below `into`; return the csv.

    Only what this category needs is written; paths keep their form relative to the archive root
    (an extra top folder, as a repacked mirror may add, is dropped), so the csv's paths resolve below `into`.
    """
    csv_target = ["split_csv", "1cls.csv"]
    found_csv = False

    def needed(parts: list[str]) -> list[str] | None:
        nonlocal found_csv
        if parts[-2:] == csv_target:
            if found_csv:
                return None  # the first one is the split (a second copy deeper down is ignored)
            found_csv = True
            return csv_target
        for i in range(len(parts) - 1):
            if parts[i] == category and parts[i + 1] == "Data":
                return parts[i:]
        return None

    extract_members(archive, into, url, needed, limits)
    if not found_csv:
        raise PipelineError(f"{url}: no {SPLIT_CSV} in the archive (not the VisA archive?)")
    return into.joinpath(*csv_target)


def read_split(csv_path: Path, category: str, shown: str) -> list[dict]:
    """The category's rows of 1cls.csv (with their line numbers), each checked for split, label and mask."""
    where = f"{shown}: {SPLIT_CSV}"
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise PipelineError(f"{where}: missing column(s) {', '.join(missing)} "
                                    f"(expected {','.join(COLUMNS)}, got {','.join(header) or 'nothing'})")
            reader.fieldnames = header
            rows, objects = [], set()
            for row in reader:
                obj = (row["object"] or "").strip()
                objects.add(obj)
                if obj == category:
                    rows.append({**{k: (row[k] or "").strip() for k in COLUMNS}, "line": reader.line_num})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{where}: unreadable ({exc})") from exc
    if not rows:
        listed = ", ".join(sorted(o for o in objects if o)) or "none"
        raise PipelineError(f"{where}: no rows for category '{category}' (its objects: {listed})")
    for row in rows:
        at = f"{where} line {row['line']}"
        if row["split"] not in ("train", "test"):
            raise PipelineError(f"{at}: split must be train or test, got {row['split']!r}")
        if row["label"] not in ("normal", "anomaly"):
            raise PipelineError(f"{at}: label must be normal or anomaly, got {row['label']!r}")
        if _path_parts(row["image"]) is None:
            raise PipelineError(f"{at}: image path {row['image']!r} is empty or leaves the archive")
        if row["split"] == "test" and row["label"] == "anomaly" and _path_parts(row["mask"]) is None:
            raise PipelineError(f"{at}: anomaly image {row['image']} has no usable mask path ({row['mask']!r})")
    return rows


def _write_mask(src: Path, target: Path, where: str) -> None:
    """VisA's mask as MVTec's 0/255 grayscale. A palette mask is read by its indices (0 good, 1..3
    defect), not its colours, so a palette whose colour 0 is not black still means good. Read through
    the bounded reader of every image (stages/data/raw.py: pixel and aspect bounds before decoding)."""
    try:
        image = _open(src)
        defect = np.asarray(image) != 0 if image.mode == "P" else np.asarray(read_mask(src)) != 0
    except PipelineError as exc:  # it names the temporary copy; name the archive's path instead
        raise PipelineError(f"{where}: {str(exc).removeprefix(f'{src}: ')}") from None
    Image.fromarray(np.where(defect, 255, 0).astype(np.uint8)).save(target)


def lay_out(rows: list[dict], files: Path, out: Path, shown: str,
            transfer: Callable[[Path, Path], object] = os.replace) -> tuple[int, int, int]:
    """Move the rows' images from `files` (the extracted archive) into MVTec layout at `out`
    (`transfer`: copy them instead, from an unpacked folder that stays as it is).

    Returns (train normal, test normal, test anomaly). Training anomalies, which the 1cls split
    does not have, are left out: train/good must hold defect-free images only.
    """
    seen: dict[tuple[str, ...], int] = {}
    taken: dict[Path, int] = {}
    counts = {"train": 0, "good": 0, DEFECT: 0}
    for row in tqdm(rows, desc="visa layout", unit="img"):
        at = f"{shown}: {SPLIT_CSV} line {row['line']}"
        source = tuple(_path_parts(row["image"]))
        if source in seen:
            raise PipelineError(f"{at}: {row['image']} is listed twice (also line {seen[source]})")
        seen[source] = row["line"]
        src = files.joinpath(*source)
        if not src.is_file():
            raise PipelineError(f"{at}: {row['image']} is not in the archive")
        if row["split"] == "train" and row["label"] != "normal":
            continue
        kind = "good" if row["label"] == "normal" else DEFECT
        folder = out / ("train" if row["split"] == "train" else "test") / kind
        target = folder / src.name
        if target in taken:
            raise PipelineError(f"{at}: {row['image']} would overwrite the image of line {taken[target]} "
                                f"({target.relative_to(out)})")
        taken[target] = row["line"]
        folder.mkdir(parents=True, exist_ok=True)
        if kind == DEFECT:
            mask = files.joinpath(*_path_parts(row["mask"]))
            if not mask.is_file():
                raise PipelineError(f"{at}: mask {row['mask']} is not in the archive")
            masks = out / "ground_truth" / DEFECT
            masks.mkdir(parents=True, exist_ok=True)
            # raw.py pairs <stem>.* with <stem>_mask.png
            _write_mask(mask, masks / f"{src.stem}_mask.png", f"{at}: mask {row['mask']}")
        transfer(src, target)  # extracted archive: a rename on the same filesystem, not a copy of the JPEGs
        counts["train" if row["split"] == "train" else kind] += 1
    return counts["train"], counts["good"], counts[DEFECT]


def check_counts(category: str, counts: tuple[int, int, int], table: dict | None, shown: str) -> None:
    """`counts` must equal table[category] (None: nothing to compare with, e.g. a mirror's archive)."""
    if table is None:
        return
    if category not in table:
        raise PipelineError(f"{shown}: no expected image counts for category '{category}'")
    expected = tuple(table[category])
    if tuple(counts) != expected:
        got, want = " / ".join(map(str, counts)), " / ".join(map(str, expected))
        raise PipelineError(f"{shown}: {category} has {got} images (train normal / test normal / test anomaly) "
                            f"in {SPLIT_CSV}, expected {want}")


def download_category(
    category: str,
    dest: Path,
    url: str | None = None,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    timeout: float = 60,
    counts: dict | None = None,
    max_gb: float = 4.0,
) -> Path:
    """Download (or reuse from `cache_dir`) the VisA archive, verify it, install `category` at `dest`.

    The official URL is checked against ARCHIVE_SHA256; another `url` against `sha256` when given;
    a file:// one is read in place, and when it names a folder (VisA_20220922.tar unpacked) the
    category is laid out from there and checked against the official counts.
    `counts` maps categories to (train normal, test normal, test anomaly); None: EXPECTED_COUNTS
    when the archive is verified as the official one, else no count check. Neither the download nor
    what it unpacks to may pass `max_gb` (data.visa.max_gb). Returns dest.
    """
    dest = Path(dest)
    unpacked = local_folder(url)
    if unpacked is not None:
        return _from_unpacked(category, unpacked, dest, counts)
    remote = _resolve_source(category, url, sha256)
    limits = Limits(total=int(max_gb * 1e9), param="data.visa.max_gb")
    if counts is None and remote.expected == ("sha256", ARCHIVE_SHA256):
        counts = EXPECTED_COUNTS
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fetched(remote, dest, cache_dir, timeout, limits) as (archive, used):
        staging = staging_dir(dest)
        try:
            split = _extract(archive, category, staging / "archive", used, limits)
            _install(read_split(split, category, used), staging / "archive", staging, dest, category, counts, used)
        finally:
            remove_path(staging)
    return dest


def _install(rows: list[dict], files: Path, staging: Path, dest: Path, category: str, counts: dict | None,
             shown: str, transfer: Callable[[Path, Path], object] = os.replace) -> None:
    """The rows' images from `files` in MVTec layout under `staging`, checked (layout, counts), then moved
    to `dest` in one step: the archive and the unpacked folder end the same way."""
    out = staging / "category"
    found = lay_out(rows, files, out, shown, transfer=transfer)
    check_layout(out, f"{shown}: {category}")
    check_counts(category, found, counts, shown)
    install_dir(out, dest)


def _copy_within(root: Path) -> Callable[[Path, Path], None]:
    """Copy a file of the unpacked folder `root`; one that resolves outside it (a link) is refused."""
    root = root.resolve()

    def copy(src: Path, target: Path) -> None:
        if not src.resolve().is_relative_to(root):
            raise PipelineError(f"{src}: links outside {root}; refused")
        copy_regular(src, target)  # a FIFO or device in place of an image is refused, not read

    return copy


def _from_unpacked(category: str, folder: Path, dest: Path, counts: dict | None) -> Path:
    """`category` from VisA_20220922.tar unpacked at `folder` (read, never changed), laid out at `dest`;
    its counts must be the official ones (EXPECTED_COUNTS) unless `counts` says otherwise."""
    if not isinstance(category, str) or category in ("", ".", "..") or "/" in category or "\\" in category:
        raise PipelineError(f"data.categories: '{category}' is not a valid category name")
    split = folder.joinpath(*SPLIT_CSV.split("/"))
    if not split.is_file():
        raise PipelineError(f"data.visa.url: {folder} has no {SPLIT_CSV} (an unpacked VisA_20220922.tar holds "
                            "split_csv/ and one folder per category)")
    if not (folder / category / "Data").is_dir():
        found = ", ".join(c for c in CATEGORIES if (folder / c / "Data").is_dir()) or "none"
        raise PipelineError(f"data.visa.url: {folder} has no '{category}/Data' folder (found: {found})")
    if counts is None and category in EXPECTED_COUNTS:
        counts = EXPECTED_COUNTS
    shown = str(folder)
    rows = read_split(split, category, shown)
    staging = staging_dir(dest)
    try:
        _install(rows, folder, staging, dest, category, counts, shown, transfer=_copy_within(folder))
    finally:
        remove_path(staging)
    return dest
