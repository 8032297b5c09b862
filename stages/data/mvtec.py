"""Getting an MVTec AD category onto disk: download + verify + extract.

Every path here is all-or-nothing: on any failure the destination is left as it was (an old,
complete copy survives; a fresh one never appears half-written) and no temporary files remain.
The fetch / verify / extract / install helpers live in stages/data/archives.py (the VisA source
uses them too); the folder source is stages/data/folder.py. data.mvtec.url may also name an unpacked
copy (file:///path/to/mvtec_anomaly_detection): each category is read from there, checked against the
official image counts, decoded, and copied into its stage output, with no archive in between.
"""
from __future__ import annotations

from pathlib import Path

from stages.core.errors import PipelineError
from stages.core.outputs import remove_path as _remove
from stages.data.archives import (
    Limits,
    Remote,
    _sibling_tmpdir,
    check_sha256,
    extract_members,
    fetched,
    install_dir,
    local_folder,
)
from stages.data.folder import copy_folder
from stages.data.raw import check_layout, list_images

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
DOWNLOAD_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
CATEGORY_PLACEHOLDER = "{category}"  # in data.mvtec.url: replaced by each category's name

ARCHIVES = ("full", "category")

# (train good, test good, test defective) of each category in the official release (Bergmann et al.
# 2019, Table 1; 3,629 training and 1,725 test images): an unpacked copy must hold exactly these.
EXPECTED_COUNTS = {
    "bottle": (209, 20, 63),
    "cable": (224, 58, 92),
    "capsule": (219, 23, 109),
    "carpet": (280, 28, 89),
    "grid": (264, 21, 57),
    "hazelnut": (391, 40, 70),
    "leather": (245, 32, 92),
    "metal_nut": (220, 22, 93),
    "pill": (267, 26, 141),
    "screw": (320, 41, 119),
    "tile": (230, 33, 84),
    "toothbrush": (60, 12, 30),
    "transistor": (213, 60, 40),
    "wood": (247, 19, 60),
    "zipper": (240, 32, 119),
}


def _extract_category(archive: Path, category: str, into: Path, url: str, limits: Limits | None = None) -> int:
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

    written = extract_members(archive, into, url, below_category, limits)
    if prefix is None:
        raise PipelineError(f"{url}: no '{category}/' folder in the archive")
    return written


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


def _check_category_name(category: str) -> None:
    if not isinstance(category, str) or category in ("", ".", "..") or "/" in category or "\\" in category:
        raise PipelineError(f"data.categories: '{category}' is not a valid category name")


def _resolve_source(category: str, url: str | None, sha256: str | None, archive: str) -> Remote:
    """The URLs to try and the (algorithm, hex digest) they must match, None when nothing is known."""
    if archive not in ARCHIVES:
        raise PipelineError(f"params.yaml: data.mvtec.archive must be one of {', '.join(ARCHIVES)}, got '{archive}'")
    _check_category_name(category)
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
    max_gb: float = 10.0,
) -> Path:
    """Download an MVTec AD archive, verify it, and install only `category` at `dest`.

    archive="full" fetches the whole dataset, trying FULL_ARCHIVE_URLS in order, each answer checked
    against FULL_ARCHIVE_SHA256, and extracts just the one category; archive="category" fetches
    CATEGORY_URLS[category], checked against its published MD5. A given `url` is the only one tried
    (it may hold "{category}"), checked against `sha256` when given; a file:// one is read in place,
    and when it names a folder (an unpacked MVTec AD) the category is taken from there. With
    `cache_dir`, the verified archive (or the record of a file:// one's checksum) is kept there and
    reused by later calls: the full one is fetched and hashed once for every category. Neither the
    download nor what it unpacks to may pass `max_gb` (data.mvtec.max_gb). Returns dest.
    """
    dest = Path(dest)
    unpacked = local_folder(url)
    if unpacked is not None:
        return _from_unpacked(category, unpacked, dest)
    remote = _resolve_source(category, url, sha256, archive)
    limits = Limits(total=int(max_gb * 1e9), param="data.mvtec.max_gb")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fetched(remote, dest, cache_dir, timeout, limits) as (archive_path, used):
        staging = _sibling_tmpdir(dest, "tmp")
        try:
            _extract_category(archive_path, category, staging, used, limits)
            check_layout(staging, f"{used}: {category}")
            install_dir(staging, dest)
            staging = None
        finally:
            if staging is not None:
                _remove(staging)
    return dest


def count_images(root: Path) -> tuple[int, int, int]:
    """(train good, test good, test defective) images of a category folder in MVTec layout."""
    test = [sub for sub in sorted((root / "test").iterdir()) if sub.is_dir()]
    defective = sum(len(list_images(sub)) for sub in test if sub.name != "good")
    return len(list_images(root / "train" / "good")), len(list_images(root / "test" / "good")), defective


def _from_unpacked(category: str, folder: Path, dest: Path) -> Path:
    """`category` from an unpacked MVTec AD at `folder`: its official image counts, then (copy_folder)
    every image and mask decoded and copied to `dest` (the user's folder is only read)."""
    _check_category_name(category)
    source = folder / category
    if not source.is_dir():
        found = ", ".join(c for c in CATEGORIES if (folder / c).is_dir()) or "none"
        raise PipelineError(f"data.mvtec.url: {folder} has no '{category}' folder (an unpacked MVTec AD holds one "
                            f"folder per category; found: {found})")
    check_layout(source)
    if category in EXPECTED_COUNTS:
        counts, expected = count_images(source), EXPECTED_COUNTS[category]
        if counts != expected:
            got, want = " / ".join(map(str, counts)), " / ".join(map(str, expected))
            raise PipelineError(f"{source}: {got} images (train good / test good / test defective), MVTec AD's "
                                f"{category} has {want}: an incomplete or altered copy")
    return copy_folder(source, dest)  # every image and mask decoded first, links leaving the folder refused
