"""Offline tests for stages/data/visa.py on a small archive built here in VisA's exact layout:
<category>/Data/Images/{Normal,Anomaly}/*.JPG, <category>/Data/Masks/Anomaly/*.png (palette PNGs with
indices 0..3) and split_csv/1cls.csv, in an uncompressed tar like VisA_20220922.tar."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages.core.errors import PipelineError
from stages.core.params import load_params
from stages.data import visa
from stages.data.archives import RECORDS, _cache_name
from stages.data.prepared import load_split
from stages.data.raw import list_category, read_mask
from tests.conftest import error_line, run_stage, write_params
from tests.test_download import leftovers, serve, sha, tree

# (train normal, test normal, test anomaly) of the small archive
SMALL = {"candle": (4, 2, 2), "pcb1": (3, 1, 2)}
PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]  # index 0 black, 1..3 red, green, blue


def _jpeg(seed: int, size=(40, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _mask(seed: int, palette=PALETTE, size=(40, 24)) -> tuple[bytes, np.ndarray]:
    """A palette PNG whose indices are 0 (good) and 1..3 (defect classes), as VisA stores them."""
    indices = np.zeros((size[1], size[0]), dtype=np.uint8)
    indices[2:8, 3:9] = 1 + seed % 3
    indices[10:14, 20:30] = 3
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue(), indices


def build_archive(
    path: Path, counts=SMALL, palette=PALETTE, csv_objects=None, extra_rows=(), extra_members=None
) -> dict:
    """Write a VisA-layout tar at `path`; returns {member name: bytes} and the mask indices."""
    members: dict[str, bytes] = {}
    indices: dict[str, np.ndarray] = {}
    rows = ["object,split,label,image,mask"]
    seed = 0
    for category, (n_train, n_good, n_bad) in counts.items():
        data = f"{category}/Data"
        for i in range(n_train + n_good):
            image = f"{data}/Images/Normal/{i:04d}.JPG"
            members[image] = _jpeg(seed := seed + 1)
            rows.append(f"{category},{'train' if i < n_train else 'test'},normal,{image},")
        for i in range(n_bad):
            image, mask = f"{data}/Images/Anomaly/{i:03d}.JPG", f"{data}/Masks/Anomaly/{i:03d}.png"
            members[image] = _jpeg(seed := seed + 1)
            members[mask], indices[mask] = _mask(i, palette)
            rows.append(f"{category},test,anomaly,{image},{mask}")
        members[f"{category}/image_anno.csv"] = b"image,label,mask\n"  # in VisA too; not needed here
    if csv_objects is not None:  # drop the rows of categories not listed
        rows = rows[:1] + [r for r in rows[1:] if r.split(",")[0] in csv_objects]
    members["split_csv/1cls.csv"] = ("\n".join([*rows, *extra_rows]) + "\n").encode()
    members["split_csv/2cls_fewshot.csv"] = b"object,split,label,image,mask\n"
    members.update(extra_members or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:  # uncompressed, like VisA_20220922.tar
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"members": members, "indices": indices}


@pytest.fixture
def archive(tmp_path) -> Path:
    return tmp_path / "serve" / "VisA_20220922.tar"


@pytest.fixture
def built(archive) -> dict:
    return build_archive(archive)


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_category_in_mvtec_layout(archive, built, out):
    dest = visa.download_category("candle", out / "candle", url=archive.as_uri(), sha256=sha(archive), counts=SMALL)
    files = tree(dest)
    members = built["members"]
    assert sorted(files) == sorted(
        [f"train/good/{i:04d}.JPG" for i in range(4)]
        + [f"test/good/{i:04d}.JPG" for i in (4, 5)]
        + [f"test/anomaly/{i:03d}.JPG" for i in (0, 1)]
        + [f"ground_truth/anomaly/{i:03d}_mask.png" for i in (0, 1)]
    )
    assert files["train/good/0003.JPG"] == members["candle/Data/Images/Normal/0003.JPG"]  # bytes as shipped
    assert files["test/good/0004.JPG"] == members["candle/Data/Images/Normal/0004.JPG"]
    assert files["test/anomaly/001.JPG"] == members["candle/Data/Images/Anomaly/001.JPG"]
    # preprocess's reader pairs every anomaly image with its mask; any nonzero index is defect
    train, test, has_masks = list_category(dest)
    assert has_masks and len(train) == 4 and [t.defect_type for t in test].count("anomaly") == 2
    for item in test:
        if item.defect_type == "anomaly":
            mask = np.asarray(read_mask(item.mask_path))
            index = built["indices"][f"candle/Data/Masks/Anomaly/{item.path.stem}.png"]
            assert np.array_equal(mask == 255, index != 0) and set(np.unique(mask)) == {0, 255}
    assert leftovers(out) == ["candle"]


def test_mask_is_read_by_index_not_colour(archive, out):
    """Index 0 is good even where the palette paints it white: VisA's labels are the indices."""
    built = build_archive(archive, palette=[255, 255, 255, 200, 0, 0, 0, 200, 0, 0, 0, 200])
    dest = visa.download_category("candle", out / "candle", url=archive.as_uri(), counts=SMALL)
    mask = np.asarray(Image.open(dest / "ground_truth/anomaly/000_mask.png"))
    assert np.array_equal(mask == 255, built["indices"]["candle/Data/Masks/Anomaly/000.png"] != 0)
    assert 0 < (mask == 255).mean() < 0.5


def test_official_archive_fetched_once_and_checked_against_the_official_counts(
    monkeypatch, tmp_path, archive, built, out
):
    """The official source (no url): one download into the cache for every category, verified by its
    SHA-256; an archive verified as the official one must hold the official counts (EXPECTED_COUNTS)."""
    with serve({"/VisA_20220922.tar": archive.read_bytes()}) as (base, requested):
        monkeypatch.setattr(visa, "ARCHIVE_URL", f"{base}/VisA_20220922.tar")
        monkeypatch.setattr(visa, "ARCHIVE_SHA256", sha(archive))
        cache = tmp_path / "cache"
        with pytest.raises(PipelineError) as info:  # the small archive is not the official 900 / 100 / 100
            visa.download_category("candle", out / "candle", cache_dir=cache, timeout=10)
        assert str(info.value) == (
            f"{base}/VisA_20220922.tar: candle has 4 / 2 / 2 images (train normal / test normal "
            "/ test anomaly) in split_csv/1cls.csv, expected 900 / 100 / 100"
        )
        visa.download_category("candle", out / "candle", cache_dir=cache, timeout=10, counts=SMALL)
        visa.download_category("pcb1", out / "pcb1", cache_dir=cache, timeout=10, counts=SMALL)
    assert requested == ["/VisA_20220922.tar"]  # fetched once, then reused from the cache
    assert leftovers(cache, keep=(RECORDS,)) == [_cache_name(f"{base}/VisA_20220922.tar")]
    assert len(list((out / "pcb1/train/good").iterdir())) == 3
    assert leftovers(out) == ["candle", "pcb1"]


def test_official_table():
    assert visa.ARCHIVE_URL == "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
    assert visa.ARCHIVE_SHA256 == "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362"
    assert visa.CATEGORIES == tuple(visa.EXPECTED_COUNTS)
    assert visa.EXPECTED_COUNTS == {
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


def test_checksum_mismatch_is_one_line(tmp_path, archive, built, out):
    cache = tmp_path / "cache"
    with pytest.raises(PipelineError) as info:
        visa.download_category("candle", out / "candle", url=archive.as_uri(), sha256="0" * 64, cache_dir=cache)
    assert str(info.value) == f"{archive.as_uri()}: sha256 checksum mismatch (expected {'0' * 64}, got {sha(archive)})"
    assert leftovers(out) == [] and leftovers(cache, keep=(RECORDS,)) == []


def test_official_url_checksum_mismatch_names_the_way_out(monkeypatch, tmp_path, out):
    with serve({"/VisA_20220922.tar": b"<html>moved</html>"}) as (base, _):
        monkeypatch.setattr(visa, "ARCHIVE_URL", f"{base}/VisA_20220922.tar")
        with pytest.raises(PipelineError) as info:
            visa.download_category("candle", out / "candle", cache_dir=tmp_path / "cache", timeout=10)
    message = str(info.value)
    assert "\n" not in message and message.startswith("could not download the VisA archive from any known URL: ")
    assert f"{base}/VisA_20220922.tar (sha256 checksum mismatch (expected {visa.ARCHIVE_SHA256}" in message
    assert "data.visa.url: file:///path/to/VisA_20220922.tar" in message
    assert leftovers(out) == []


def test_count_mismatch_is_one_line_and_keeps_the_old_copy(archive, built, out):
    dest = visa.download_category("candle", out / "candle", url=archive.as_uri(), counts=SMALL)
    before = tree(dest)
    with pytest.raises(PipelineError) as info:
        visa.download_category("candle", dest, url=archive.as_uri(), counts={"candle": (4, 2, 3)})
    assert str(info.value) == (
        f"{archive.as_uri()}: candle has 4 / 2 / 2 images (train normal / test normal / "
        "test anomaly) in split_csv/1cls.csv, expected 4 / 2 / 3"
    )
    assert tree(dest) == before and leftovers(out) == ["candle"]


def test_category_missing_from_the_csv(archive, out):
    build_archive(archive, csv_objects={"candle", "pcb1"}, counts={**SMALL, "capsules": (2, 1, 1)})
    with pytest.raises(PipelineError) as info:
        visa.download_category("capsules", out / "capsules", url=archive.as_uri())
    assert str(info.value) == (
        f"{archive.as_uri()}: split_csv/1cls.csv: no rows for category 'capsules' (its objects: candle, pcb1)"
    )
    assert leftovers(out) == []


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            "candle,test,anomaly,candle/Data/Images/Anomaly/009.JPG,candle/Data/Masks/Anomaly/009.png",
            "line 16: candle/Data/Images/Anomaly/009.JPG is not in the archive",
        ),
        ("candle,val,normal,candle/Data/Images/Normal/0000.JPG,", "line 16: split must be train or test, got 'val'"),
        ("candle,test,bad,candle/Data/Images/Normal/0000.JPG,", "line 16: label must be normal or anomaly, got 'bad'"),
        (
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,",
            "line 16: anomaly image candle/Data/Images/Anomaly/000.JPG has no usable mask path ('')",
        ),
        (
            "candle,test,normal,candle/Data/Images/Normal/0000.JPG,",
            "line 16: candle/Data/Images/Normal/0000.JPG is listed twice (also line 2)",
        ),
        (
            "candle,test,normal,../../etc/passwd,",
            "line 16: image path '../../etc/passwd' is empty or leaves the archive",
        ),
    ],
)
def test_bad_csv_rows_are_one_line(archive, out, row, expected):
    build_archive(archive, extra_rows=[row])
    with pytest.raises(PipelineError) as info:
        visa.download_category("candle", out / "candle", url=archive.as_uri())
    assert str(info.value) == f"{archive.as_uri()}: split_csv/1cls.csv {expected}"
    assert leftovers(out) == []


def test_training_anomalies_are_left_out(archive, out):
    """train/good holds defect-free images only: a defective image in the csv's train split is dropped."""
    image, mask = "candle/Data/Images/Anomaly/100.JPG", "candle/Data/Masks/Anomaly/100.png"
    build_archive(
        archive,
        extra_rows=[f"candle,train,anomaly,{image},{mask}"],
        extra_members={image: _jpeg(100), mask: _mask(0)[0]},
    )
    dest = visa.download_category("candle", out / "candle", url=archive.as_uri(), counts=SMALL)
    assert not any(name.startswith("100") for name in map(lambda p: p.name, dest.rglob("*")))
    assert len(list((dest / "train/good").iterdir())) == 4


def test_archive_without_split_csv(tmp_path, out):
    archive = tmp_path / "nocsv.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("candle/Data/Images/Normal/0000.JPG")
        payload = _jpeg(0)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(PipelineError, match=r"nocsv\.tar: no split_csv/1cls\.csv in the archive"):
        visa.download_category("candle", out / "candle", url=archive.as_uri())
    assert leftovers(out) == []


def test_unknown_category_without_url(out):
    with pytest.raises(PipelineError, match=r"data\.categories: 'carpet' is not a VisA category \(one of candle, "):
        visa.download_category("carpet", out / "carpet")


def test_params_accept_visa_and_check_its_block(project):
    params = load_params(project / "params.yaml")
    assert params["data"]["visa"] == {"url": None, "sha256": None, "max_gb": 4.0}
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"].update(source="visa", categories=["candle"])
    raw["data"]["visa"]["sha256"] = "abc"
    write_params(project, raw)
    with pytest.raises(PipelineError, match=r"data\.visa\.sha256: must be a SHA-256 hex digest"):
        load_params(project / "params.yaml")
    raw["data"]["visa"]["sha256"] = None
    write_params(project, raw)
    assert load_params(project / "params.yaml")["data"]["source"] == "visa"


def test_download_and_preprocess_stages(project, archive, built, user_cache):
    """data.sources.<category>: visa through the real stage scripts, then preprocess reads the result."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(categories=["candle"], sources={"candle": "visa"})  # source stays synthetic
    params["data"]["visa"].update(url=archive.as_uri(), sha256=sha(archive))
    params["preprocess"].update(resize=32, crop_size=24, val_fraction=0.25)
    write_params(project, params)
    run_stage("download", "candle", cwd=project, check=True)
    assert (project / "data/raw/candle.dataset/ground_truth/anomaly/001_mask.png").is_file()
    # read in place: the user cache holds the record of its checksum, no copy, nothing in the project
    assert leftovers(user_cache / "anomaly-pipeline/downloads") == [RECORDS]
    assert not (project / "data/downloads").exists()
    run_stage("preprocess", "candle", cwd=project, check=True)
    test = load_split(project / "data/features/candle.category/pixels.features/test.npz")
    assert test.defect_types == ["anomaly", "anomaly", "good", "good"] and list(test.labels) == [1, 1, 0, 0]
    assert test.masks[:2].any(axis=(1, 2)).all() and not test.masks[2:].any()
    # a wrong checksum through the stage: one error line, the dataset stays
    params["data"]["visa"]["sha256"] = "1" * 64
    write_params(project, params)
    line = error_line(run_stage("download", "candle", cwd=project))
    assert line == f"error: {archive.as_uri()}: sha256 checksum mismatch (expected {'1' * 64}, got {sha(archive)})"
    assert (project / "data/raw/candle.dataset/train/good").is_dir()


def test_synthetic_data_under_a_visa_name_is_flagged(project):
    """A synthetic 'candle' is a carpet-like texture: the download says so and names the visa source."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(categories=["candle"])
    params["data"]["synthetic"].update(image_size=32, n_train=2, n_test_good=1, n_test_per_cell=1)
    write_params(project, params)
    result = run_stage("download", "candle", cwd=project, check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: data.categories: 'candle' is generated by the synthetic source (a carpet-like "
        "texture), not VisA's candle; set data.source (or data.sources.candle) to visa for the real one"
    ]


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def test_unpacked_folder_is_read_in_place(tmp_path, archive, built, out):
    """VisA_20220922.tar unpacked: each category laid out from the folder, which is only read."""
    root = unpack(archive, tmp_path / "VisA")
    before = tree(root)
    for category in SMALL:
        visa.download_category(category, out / category, url=root.as_uri(), counts=SMALL)
    assert tree(out / "candle") == tree(visa.download_category("candle", out / "from-archive", url=archive.as_uri(),
                                                               counts=SMALL))
    assert tree(root) == before
    assert len(list((out / "pcb1/train/good").iterdir())) == 3


def test_unpacked_folder_is_checked_against_the_official_counts(tmp_path, archive, built, out):
    root = unpack(archive, tmp_path / "VisA")
    with pytest.raises(PipelineError) as info:
        visa.download_category("candle", out / "candle", url=root.as_uri())
    assert str(info.value) == (f"{root}: candle has 4 / 2 / 2 images (train normal / test normal / test anomaly) "
                               "in split_csv/1cls.csv, expected 900 / 100 / 100")
    assert leftovers(out) == []


def test_unpacked_folder_missing_a_category_is_one_line(tmp_path, archive, built, out):
    root = unpack(archive, tmp_path / "VisA")
    with pytest.raises(PipelineError) as info:
        visa.download_category("cashew", out / "cashew", url=root.as_uri(), counts=SMALL)
    assert str(info.value) == f"data.visa.url: {root} has no 'cashew/Data' folder (found: candle, pcb1)"
    (root / "split_csv/1cls.csv").unlink()
    with pytest.raises(PipelineError, match=r"has no split_csv/1cls\.csv \(an unpacked VisA_20220922\.tar"):
        visa.download_category("candle", out / "candle", url=root.as_uri(), counts=SMALL)
    assert leftovers(out) == []


def test_unpacked_folder_link_outside_is_refused(tmp_path, archive, built, out):
    """A file of the unpacked folder that is a link to elsewhere is not read."""
    root = unpack(archive, tmp_path / "VisA")
    secret = tmp_path / "secret.JPG"
    secret.write_bytes(b"not for the dataset")
    image = root / "candle/Data/Images/Normal/0000.JPG"
    image.unlink()
    image.symlink_to(secret)
    with pytest.raises(PipelineError, match="links outside"):
        visa.download_category("candle", out / "candle", url=root.as_uri(), counts=SMALL)
    assert leftovers(out) == []
