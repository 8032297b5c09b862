"""The fit stage holds one seed at a time: each seed's detector is saved as soon as it is fitted and
released before the next seed starts, and the model folder appears only when every seed is done. The
evaluate stage too: each seed's detector is released before the next is loaded."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from stages.core.errors import PipelineError
from stages.methods import get_method
from tests.conftest import MODELS_FITTED, call_stage, default_params, write_params

MODEL = "ae"  # a pixel autoencoder: its fit draws random numbers (one fit per seed), and needs no backbone
SEEDS = [5, 6, 7]


@pytest.fixture
def prepared(tmp_path) -> Path:
    params = default_params()
    params["data"]["synthetic"].update(image_size=32, n_train=8, n_test_good=2, n_test_per_cell=1,
                                       defect_types=["color", "hole"])
    params["data"]["synthetic"]["levels"] = params["data"]["synthetic"]["levels"][:1]  # the easiest level only
    params["preprocess"].update(resize=32, crop_size=32, val_fraction=0.25)
    params["device"] = "cpu"
    params["fit_seeds"] = SEEDS
    params["models"] = {MODEL: {**MODELS_FITTED[MODEL], "fit": {**MODELS_FITTED[MODEL]["fit"], "epochs": 1}}}
    write_params(tmp_path, params)
    for stage in ("download", "preprocess"):
        call_stage(stage, "carpet", cwd=tmp_path)
    return tmp_path


def watch_fits(monkeypatch, project: Path, fail_at: int | None = None) -> list[dict]:
    """At the start of each seed's fit: how many detectors are alive, and which seeds are already on disk
    (in the stage's temporary folder under .tmp/, the only place they can be before the end)."""
    cls = get_method(MODELS_FITTED[MODEL]["method"])
    alive: weakref.WeakSet = weakref.WeakSet()
    seen: list[dict] = []
    real_fit = cls.fit

    def fit(self, train, val):
        alive.add(self)
        gc.collect()
        saved = sorted(p.parent.name for p in (project / ".tmp").glob(f"*/{MODEL}.model/seed-*/model.pt"))
        seen.append({"seed": self.seed, "alive": len(alive), "saved": saved})
        if self.seed == fail_at:
            raise PipelineError("this seed fails")
        return real_fit(self, train, val)

    monkeypatch.setattr(cls, "fit", fit)
    return seen


def test_each_seed_is_saved_and_released_before_the_next(monkeypatch, prepared):
    seen = watch_fits(monkeypatch, prepared)
    call_stage("fit", "carpet", MODEL, cwd=prepared)
    assert seen == [
        {"seed": 5, "alive": 1, "saved": []},
        {"seed": 6, "alive": 1, "saved": ["seed-5"]},  # the first fit on disk, and out of memory
        {"seed": 7, "alive": 1, "saved": ["seed-5", "seed-6"]},
    ]
    folder = prepared / f"models/carpet.category/{MODEL}.model"
    assert sorted(p.name for p in folder.iterdir()) == ["seed-5", "seed-6", "seed-7"]
    assert all((folder / f"seed-{s}/model.pt").stat().st_size > 0 for s in SEEDS)
    assert not list((prepared / ".tmp").iterdir())
    assert (prepared / f"plots/carpet.category/{MODEL}.model/train/metrics.json").is_file()


def test_a_failing_seed_leaves_no_model_folder(monkeypatch, prepared):
    """Seeds saved before the failure never become a model folder DVC could cache as complete."""
    seen = watch_fits(monkeypatch, prepared, fail_at=7)
    with pytest.raises(PipelineError, match=rf"models\.{MODEL} \(carpet, seed 7\): this seed fails"):
        call_stage("fit", "carpet", MODEL, cwd=prepared)
    assert [s["saved"] for s in seen][-1] == ["seed-5", "seed-6"]
    assert not (prepared / f"models/carpet.category/{MODEL}.model").exists()
    assert not (prepared / f"plots/carpet.category/{MODEL}.model").exists()
    assert not list((prepared / ".tmp").iterdir())


def test_evaluate_holds_one_seeds_model_at_a_time(monkeypatch, prepared):
    """Evaluate loads each seed's detector, scores with it and releases it before loading the next (a PaDiM
    state at the paper's settings is 3.5 GiB per seed; holding every seed's peaked at 11.6 GiB for three)."""
    from stages.methods.entries import ModelConfig

    call_stage("fit", "carpet", MODEL, cwd=prepared)
    alive: weakref.WeakSet = weakref.WeakSet()
    before_each_load: list[int] = []
    real_load = ModelConfig.load

    def load(self, device, seed):
        gc.collect()
        before_each_load.append(len(alive))
        detector = real_load(self, device, seed)
        alive.add(detector)
        return detector

    monkeypatch.setattr(ModelConfig, "load", load)
    call_stage("evaluate", "carpet", MODEL, cwd=prepared)
    assert before_each_load == [0, 0, 0]  # no earlier seed's detector alive when the next one loads
    metrics = (prepared / f"metrics/models/carpet.category/{MODEL}.metrics.json").read_text()
    assert '"n_train"' in metrics  # the first seed's training count, kept without its detector
