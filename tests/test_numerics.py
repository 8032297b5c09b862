"""`numerics: strict`: the same bytes whatever SIMD kernels the CPU offers and however many threads run.

Each variant runs the computing stages in a fresh process (the kernels are chosen when numpy and
torch load, so the environment must be set before): with the CPU's own kernels (AVX-512 where it has
them) or capped to AVX2 by the environment, on one core with one thread or on two. Under strict
every output is byte-identical across the variants; under fast the test records what differs (on an
AVX-512 machine the trained network and the scores move, as they did between two machines).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODELS_FITTED, REPO, call_stage, default_params, write_params

# one worker runs this file: its module-scoped projects are built once, not once per worker
pytestmark = pytest.mark.xdist_group("numerics")

CAPPED = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
NATIVE = {"ATEN_CPU_CAPABILITY": "", "ONEDNN_MAX_CPU_ISA": "ALL", "MKL_CBWR": "AUTO", "MKL_ENABLE_INSTRUCTIONS": ""}
# the two extremes: every native kernel on two threads, AVX2 kernels on one thread on one core (the kernels
# and thread counts between them differ from these in fewer ways; bench/cross_cpu_check.py covers other CPUs)
VARIANTS = {
    "native kernels, 2 threads": {**NATIVE, "OMP_NUM_THREADS": "2"},
    "AVX2 kernels, 1 thread on 1 core": {**CAPPED, "OMP_NUM_THREADS": "1", "taskset": "0"},
}
# One stage of each kind of arithmetic: convolutions forward (extract), a trained network (fit of
# the pixel autoencoder), nearest neighbours, interpolation and smoothing (evaluate of PatchCore).
STAGES = [
    ("extract", "carpet", "efficientnet_lite0"),
    ("fit", "carpet", "ae"),
    ("fit", "carpet", "pc"),
    ("evaluate", "carpet", "pc"),
]
OUTPUTS = (
    "data/features/carpet.category/efficientnet_lite0.features",
    "models/carpet.category/ae.model",
    "models/carpet.category/pc.model",
    "metrics/models/carpet.category/pc.metrics.json",
    "plots/carpet.category/pc.model/scores.csv",
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("numerics")
    params = default_params()
    params["data"]["synthetic"].update(
        image_size=64, n_train=8, n_test_good=2, n_test_per_cell=1, defect_types=["color", "hole"]
    )
    params["data"]["synthetic"]["levels"] = params["data"]["synthetic"]["levels"][:1]  # the easiest level only
    params["preprocess"].update(resize=56, crop_size=48, val_fraction=0.25)
    params.update(device="cpu", fit_seeds=[0])
    params["evaluate"]["bootstrap"]["resamples"] = 20
    params["models"] = MODELS_FITTED
    write_params(project, params)
    for stage in ("download", "preprocess"):
        call_stage(stage, "carpet", cwd=project)
    return project


def run_variant(prepared: Path, folder: Path, mode: str, variant: dict) -> dict[str, str]:
    """The stages in one fresh process under `mode` and the environment of `variant`: md5 per output file."""
    shutil.copytree(prepared, folder)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["numerics"] = mode
    write_params(folder, params)
    script = "; ".join(
        ["import sys", "from tests.conftest import call_stage", "from pathlib import Path"]
        + [f"call_stage({s!r}, *{args!r}, cwd=Path.cwd())" for s, *args in STAGES]
    )
    env = {k: v for k, v in os.environ.items() if k not in CAPPED and k != "OMP_NUM_THREADS"}
    env.update({k: v for k, v in variant.items() if k != "taskset" and v}, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    command = [sys.executable, "-c", script]
    if "taskset" in variant and shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1:
        command = ["taskset", "-c", variant["taskset"], *command]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for output in OUTPUTS
        for p in sorted([folder / output, *(folder / output).rglob("*")])
        if p.is_file()
    }


def differing(runs: dict[str, dict[str, str]]) -> set[str]:
    first = next(iter(runs.values()))
    return {path for run in runs.values() for path in first if run[path] != first[path]}


@pytest.fixture(scope="module")
def strict_runs(prepared, tmp_path_factory) -> dict[str, dict[str, str]]:
    base = tmp_path_factory.mktemp("strict")
    return {name: run_variant(prepared, base / str(i), "strict", v) for i, (name, v) in enumerate(VARIANTS.items())}


def test_strict_gives_the_same_bytes_with_any_kernels_and_threads(strict_runs):
    first = next(iter(strict_runs.values()))
    assert len(first) >= 8 and any(p.endswith("model.pt") for p in first)
    assert differing(strict_runs) == set()


def native_capability() -> str:
    env = {k: v for k, v in os.environ.items() if k not in CAPPED}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd="/"
    ).stdout.strip()


def test_fast_documents_what_differs(prepared, strict_runs, tmp_path):
    """fast: each library takes what the CPU offers. The two extremes are compared: all native kernels
    on two threads, and AVX2 kernels on one thread: where the CPU has AVX-512, the trained network is
    not the same between them."""
    extremes = VARIANTS
    runs = {name: run_variant(prepared, tmp_path / str(i), "fast", v) for i, (name, v) in enumerate(extremes.items())}
    changed = differing(runs)
    print(
        f"numerics: fast on a {native_capability()} CPU: {len(changed)} of {len(next(iter(runs.values())))} "
        f"output files differ between {' and '.join(extremes)}: {sorted(changed)}"
    )
    if native_capability().startswith("AVX512"):
        assert "models/carpet.category/ae.model/seed-0/model.pt" in changed


def test_strict_switches_torch_to_deterministic_algorithms_without_importing_the_compiler():
    """configure_torch sets torch's deterministic switch and leaves the compiler stack unimported:
    importing it (torch.use_deterministic_algorithms does) cost every stage process about 4 s."""
    code = ("import sys; import stages.core.numerics as n; n.apply_environment('strict'); import torch; "
            "n.configure_torch(); print(torch.are_deterministic_algorithms_enabled(),"
            " 'torch._inductor' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]
