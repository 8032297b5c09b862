"""bench/stand_in.py: a paper configuration through the stage scripts on a generated stand-in (here a tiny
one), its measurements, the extrapolation to MVTec AD's 15 categories, and the budget block it writes."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("stand_in", REPO / "bench" / "stand_in.py")
stand_in = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stand_in)


def test_a_tiny_stand_in_through_the_stage_scripts(tmp_path):
    """The shipped PatchCore configuration (WideResNet50, random weights), at 64 px and two seeds (--fit-seeds) so the
    suite stays quick: every stage measured in its own process, the disk of its outputs, a budget."""
    config = yaml.safe_load((REPO / "configs/patchcore_paper.yaml").read_text())
    config["preprocess"].update(resize=64, crop_size=64)
    assert config["fit_seeds"] == [0, 1, 2]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out, work = tmp_path / "result.json", tmp_path / "work"
    command = [sys.executable, str(REPO / "bench/stand_in.py"), "run", "--config", str(tmp_path / "tiny.yaml"),
               "--numerics", "strict", "--category", "tiny=4,1,2", "--image-size", "64", "--fit-seeds", "0", "1",
               "--stages", "preprocess,extract,fit,evaluate", "--workdir", str(work), "--keep", "--out", str(out)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    measured = json.loads(out.read_text())
    assert measured["numerics"] == "strict" and measured["device"] == "cpu" and measured["fit_seeds"] == [0, 1]
    (category,) = measured["measured"]
    assert category["counts"] == {"train": 4, "good": 1, "defective": 5}  # five defect types, one image each
    assert [s["stage"] for s in category["stages"]] == [
        "preprocess@standin_tiny", "extract@standin_tiny-wide_resnet50_2", "fit@standin_tiny-patchcore_wrn50",
        "evaluate@standin_tiny-patchcore_wrn50"]
    for stage in category["stages"]:
        assert stage["seconds"] > 0 and stage["cpu_seconds"] > 0
        assert 0.2 < stage["peak_rss_gib"] < 8, stage  # the process's own peak: torch alone is a few hundred MB
    assert category["disk_bytes"]["data/features"] > 0 and category["disk_bytes"]["data/evaluations"] > 0
    project = work / "standin_tiny"
    models = project / "models/standin_tiny.category/patchcore_wrn50.model"
    assert sorted(p.name for p in models.iterdir()) == ["seed-0", "seed-1"]
    assert category["disk_bytes"]["models"] >= sum(f.stat().st_size for f in models.rglob("*") if f.is_file())
    recipe = json.loads((project / "data/features/standin_tiny.category/wide_resnet50_2.features/inputs.json")
                        .read_text())
    assert recipe["backbone"]["weights"] == "weights/wide_resnet50_2-random.pth"  # no download, same cost
    budget = measured["budget"]
    assert budget["categories"] == 15 and budget["hours"] > 0 and budget["disk_gib"] > 0
    assert budget["peak_rss_gib"] == max(s["peak_rss_gib"] for s in category["stages"])

    # another measurement on the same images (--images-from the kept run): linked, not generated again
    again, second = tmp_path / "again", tmp_path / "again.json"
    command = [*command[: command.index("--stages")], "--stages", "preprocess", "--workdir", str(again), "--keep",
               "--out", str(second), "--images-from", str(work)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (category,) = json.loads(second.read_text())["measured"]
    assert category["generated"] is None and [s["stage"] for s in category["stages"]] == ["preprocess@standin_tiny"]
    images = sorted((project / "data/raw/standin_tiny.dataset").rglob("*.png"))
    linked = [again / "standin_tiny" / image.relative_to(project) for image in images]
    assert images and all(image.stat().st_ino == link.stat().st_ino for image, link in zip(images, linked))
    checkpoint = "weights/wide_resnet50_2-random.pth"  # the kept run's random weights: linked, not made again
    assert (again / checkpoint).stat().st_ino == (work / checkpoint).stat().st_ino
    command[command.index("--workdir") + 1] = str(tmp_path / "never")
    missing = subprocess.run([*command[:-1], str(tmp_path / "nowhere")], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (f"--images-from {tmp_path / 'nowhere'}: no "
                                      "standin_tiny/data/raw/standin_tiny.dataset")
    assert not (tmp_path / "never").exists()  # refused before anything is made


def measured_at(name: str, counts: tuple[int, int, int]) -> dict:
    """A measured stand-in whose costs are known lines: fit 10 s + 0.5 s per training image, evaluate
    2 s + 1 s per test image; models 100 + 7 bytes per training image, features 3 bytes per image."""
    train, good, defective = counts
    test = good + defective
    return {"category": f"standin_{name}", "counts": {"train": train, "good": good, "defective": defective},
            "image_size": 1024,
            "stages": [{"stage": f"fit@{name}", "kind": "fit", "seconds": 10 + 0.5 * train, "peak_rss_gib": 2.0},
                       {"stage": f"evaluate@{name}", "kind": "evaluate", "seconds": 2 + test, "peak_rss_gib": 3.0}],
            "disk_bytes": {"data/raw": 0, "data/features": 3 * (train + test), "models": 100 + 7 * train,
                           "data/evaluations": 0, "metrics": 0, "plots": 0}}


def test_extrapolation_is_exact_for_a_cost_linear_in_images():
    measured = [measured_at(name, stand_in.EXPECTED_COUNTS[name]) for name in ("toothbrush", "hazelnut")]
    budget = stand_in.extrapolate(measured)
    counts = stand_in.EXPECTED_COUNTS.values()
    seconds = sum(10 + 0.5 * t + 2 + g + d for t, g, d in counts)
    disk = sum(3 * (t + g + d) + 100 + 7 * t for t, g, d in counts)
    assert budget["hours"] == pytest.approx(seconds / 3600)
    assert budget["disk_gib"] == pytest.approx(disk / 2**30)
    assert budget["measured_as_is"] == ["hazelnut", "toothbrush"]
    assert (budget["peak_rss_gib"], budget["peak_stage"]) == (3.0, "evaluate@toothbrush")


def test_extrapolation_is_an_upper_bound_for_a_convex_cost():
    """A fit growing with the square of the training set (the greedy coreset): the line between the
    smallest and the largest category lies above it everywhere in between."""
    measured = [measured_at(name, stand_in.EXPECTED_COUNTS[name]) for name in ("toothbrush", "hazelnut")]
    for m in measured:
        m["stages"] = [{**m["stages"][0], "seconds": m["counts"]["train"] ** 2 / 100}]
    true = sum(t**2 / 100 for t, _, _ in stand_in.EXPECTED_COUNTS.values())
    assert stand_in.extrapolate(measured)["hours"] * 3600 > true


def result(numerics: str, device: str, hours: float, fit_seeds=(0, 1, 2)) -> dict:
    measured = [measured_at(name, stand_in.EXPECTED_COUNTS[name]) for name in ("toothbrush", "hazelnut")]
    # the largest category's extract: the machine's speed in the block
    measured[1]["stages"].append({"stage": "extract@hazelnut", "kind": "extract", "seconds": 150.2,
                                  "peak_rss_gib": 1.0})
    budget = stand_in.extrapolate(measured) | {"hours": hours}
    return {"config": "configs/patchcore_paper.yaml", "numerics": numerics, "device": device, "date": "2026-12-07",
            "fit_seeds": list(fit_seeds),
            "host": {"cpu": "Test CPU", "cores": 2} | ({"gpu": "Test GPU"} if device == "cuda" else {}),
            "load_before": [0.5, 0.5, 0.5], "measured": measured, "budget": budget}


def run_budget(config, *results) -> subprocess.CompletedProcess:
    """`python bench/stand_in.py budget --write <config> <result files>`, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "bench/stand_in.py"), "budget", "--write", str(config),
                           *map(str, results)], capture_output=True, text=True)


def block_of(text: str) -> str:
    return text.split("# budget:start")[1].split("# budget:end")[0]


def test_budget_block_is_written_into_the_config(tmp_path):
    config = tmp_path / "patchcore_paper.yaml"
    original = (REPO / "configs/patchcore_paper.yaml").read_text()
    config.write_text(original)
    files = []
    for numerics, device, hours in (("strict", "cpu", 12.25), ("fast", "cpu", 7.5)):
        files.append(tmp_path / f"{numerics}_{device}.json")
        files[-1].write_text(json.dumps(result(numerics, device, hours)))
    run = run_budget(config, *files)
    assert run.returncode == 0, run.stderr
    text = config.read_text()
    block = block_of(text)
    assert "12.2 h (2-core Test CPU) with numerics: strict; 7.5 h (2-core Test CPU) with numerics: fast;" in block
    assert "not measured (device: cuda, numerics: fast)" in block  # no GPU result given
    assert "peak RAM:  3.0 GiB (evaluate@toothbrush)" in block
    assert "stand-ins of toothbrush (60 + 42 images), hazelnut (391 + 110 images), 1024 px" in block
    assert "extrapolated: 13 of the 15 categories" in block
    # each run with how fast its machine was: the largest category's extract (the same work either numerics)
    assert "(strict/cpu 2026-12-07 load 0.5, hazelnut extract 150 s; fast/cpu 2026-12-07 load 0.5, hazelnut extract " \
        "150 s)" in block
    # everything outside the block is as it was, and the file still parses to the same params
    assert text.split("# budget:start")[0] == original.split("# budget:start")[0]
    assert text.split("# budget:end")[1] == original.split("# budget:end")[1]
    assert yaml.safe_load(text) == yaml.safe_load(original)
    # results of another configuration are refused
    other = run_budget(REPO / "configs/padim_paper.yaml", files[0])
    assert other.returncode != 0 and "not padim_paper.yaml" in other.stderr
    # and a measurement with other seeds (bench/stand_in.py run --fit-seeds 0) is not the config's budget
    one_seed = tmp_path / "one_seed.json"
    one_seed.write_text(json.dumps(result("fast", "cpu", 2.5, fit_seeds=[0])))
    before = config.read_text()
    refused = run_budget(config, files[0], one_seed)
    assert refused.returncode == 1 and config.read_text() == before
    assert refused.stderr.strip() == f"{one_seed}: measured with fit_seeds [0], {config} has [0, 1, 2]"
    # a GPU run (bench/stand_in.py run --numerics fast --device cuda) fills the GPU's hours, named by its card;
    # disk and peak RAM stay the CPU runs' (the GPU's peak is its own memory, not the host's RAM)
    gpu = tmp_path / "fast_cuda.json"
    gpu_result = result("fast", "cuda", 0.84)
    gpu_result["budget"] |= {"peak_rss_gib": 99.0, "disk_gib": 99.0}
    gpu.write_text(json.dumps(gpu_result))
    with_gpu = run_budget(config, *files, gpu)
    assert with_gpu.returncode == 0, with_gpu.stderr
    block = block_of(config.read_text())
    assert "#              0.8 h (Test GPU) (device: cuda, numerics: fast); the download" in block
    assert "peak RAM:  3.0 GiB (evaluate@toothbrush)" in block and "99.0" not in block
    assert "fast/cuda 2026-12-07 load 0.5, hazelnut extract 150 s)" in block


def test_the_shipped_configs_have_a_budget_block():
    for name in ("patchcore_paper", "padim_paper"):
        text = (REPO / f"configs/{name}.yaml").read_text()
        assert text.count("# budget:start") == 1 and text.count("# budget:end") == 1, name
