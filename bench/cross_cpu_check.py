"""Does `numerics: strict` give the same bytes on another CPU? Runs the computing stages of a tiny
project natively and under qemu-user emulating other CPU models, and compares every output's md5.

    apt-get install qemu-user                       # qemu-x86_64
    .venv/bin/python bench/cross_cpu_check.py --cpus Haswell EPYC-Rome --json bench/results/cross_cpu.json

qemu-user runs the same Linux binaries with the CPUID of the model it emulates (vendor, instruction
sets, cache sizes), so every library picks its kernels as it would on that CPU: `Haswell` is an
Intel CPU with AVX2 and no AVX-512, `EPYC-Rome` an AMD one. The native run is this machine's CPU.
The stages: tests/test_numerics.py's (extract, a trained pixel autoencoder, PatchCore fit and
evaluate), a model of every other method fitted and evaluated (PaDiM, the kNN, the feature AE and
VAE, the skip autoencoder), and the export of every model (its model.onnx, parity check included).
About 6 minutes per emulated CPU on 2 shared cores (load average 11 to 13).

What it cannot see: qemu computes the approximate instructions (rcpps, rsqrtps) exactly, where real
CPUs differ by vendor, so a kernel built on them could agree here and differ on hardware; strict
mode keeps MKL off them (MKL_CBWR=COMPATIBLE). bench/results/cross_cpu.json: 2026-12-07, native AMD
EPYC (AVX-512) against emulated Intel Haswell and AMD EPYC-Rome, the nearest-neighbour product in
OpenBLAS's Haswell kernels (stages/methods/neighbours.py): all 85 files identical (89 on 2026-12-06,
before the model folders were re-laid out, also identical). On 2026-12-06, with torch's
constant folding in the export (as it was), the model.onnx of the five EfficientNet-Lite0 models
(PatchCore, PaDiM, kNN, feature AE and VAE) differed under both emulated CPUs, 84 of 89 identical,
as they did on a real Intel CPU: the folding merges each BatchNorm into its convolution with torch's
float32 sqrt, which is MKL's vector sqrt (mkl_vml_kernel_sSqrt, not correctly rounded; its kernel
depends on the CPU even in COMPATIBLE mode): a tenth of the folded weights moved by 1 to 4 ulp, biases
where terms cancel by more (stages/deploy/onnx_model.py export_onnx now folds nothing). 2026-12-02,
before the check ran the export and the other methods: with MKL's AVX2 mode and torch's own float32
sqrt instead, 10 and 11 of its 46 files differed (the trained autoencoder, the kNN, PaDiM, PatchCore).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.methods import REGISTRY  # noqa: E402  (after the path: the repository's packages)
from tests.conftest import EVERY_METHOD, MODELS_FITTED, call_stage, default_params, write_params  # noqa: E402

# the tiny models of the check: PatchCore and the pixel autoencoder as in tests/test_numerics.py, plus a
# model of every other registered method (tests/conftest.py's EVERY_METHOD), with PaDiM kept small
MODELS = {
    **MODELS_FITTED,
    "padim": {"method": "padim", "backbone": "efficientnet_lite0", "fit": {"dimensions": 20}},
    "knn": {"method": "global_knn", "backbone": "efficientnet_lite0", "score": {"k": 3}},
    **{name: EVERY_METHOD[name] for name in ("fae", "fvae", "skip")},
}
STAGES = [("extract", "carpet", "efficientnet_lite0"), ("fit", "carpet", "ae"), ("fit", "carpet", "pc"),
          ("evaluate", "carpet", "pc"), ("fit", "carpet", "padim"), ("evaluate", "carpet", "padim"),
          ("fit", "carpet", "knn"), ("evaluate", "carpet", "knn"), ("evaluate", "carpet", "ae"),
          *[(stage, "carpet", name) for name in ("fae", "fvae", "skip") for stage in ("fit", "evaluate")],
          *[("export", "carpet", name) for name in MODELS]]  # the ONNX file of every model
OUTPUTS = ("data/features/carpet.category/efficientnet_lite0.features", "models/carpet.category",
           "metrics/models/carpet.category", "plots/carpet.category")


def prepare(root: Path) -> Path:
    missing = set(REGISTRY) - {model["method"] for model in MODELS.values()}
    assert not missing, f"no model of the methods {sorted(missing)} in the check"
    project = root / "prepared"
    project.mkdir()
    params = default_params()
    params["data"]["synthetic"].update(image_size=64, n_train=8, n_test_good=2, n_test_per_cell=1,
                                       defect_types=["color", "hole"])
    params["data"]["synthetic"]["levels"] = params["data"]["synthetic"]["levels"][:1]
    params["preprocess"].update(resize=56, crop_size=48, val_fraction=0.25)
    params.update(device="cpu", fit_seeds=[0], numerics="strict")
    params["evaluate"]["bootstrap"]["resamples"] = 20
    params["models"] = MODELS
    write_params(project, params)
    for stage in ("download", "preprocess"):
        call_stage(stage, "carpet", cwd=project)
    return project


def run(prepared: Path, folder: Path, cpu: str | None) -> dict[str, str]:
    shutil.copytree(prepared, folder)
    script = "; ".join(["from tests.conftest import call_stage", "from pathlib import Path"]
                       + [f"call_stage({s!r}, *{args!r}, cwd=Path.cwd())" for s, *args in STAGES])
    command = [sys.executable, "-c", script]
    if cpu:
        command = ["qemu-x86_64", "-cpu", cpu, *command]
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    start = time.monotonic()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{cpu or 'native'}: stages failed:\n{result.stderr[-3000:]}")
    print(f"{cpu or 'native'}: {len(STAGES)} stages in {time.monotonic() - start:.0f} s", flush=True)
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for output in OUTPUTS for p in sorted((folder / output).rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", nargs="+", default=["Haswell"], help="qemu CPU models (qemu-x86_64 -cpu help)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    native_cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared = prepare(root)
        runs = {f"native ({native_cpu})": run(prepared, root / "native", None)}
        for cpu in args.cpus:
            runs[f"qemu {cpu}"] = run(prepared, root / cpu, cpu)
    first_name, first = next(iter(runs.items()))
    result = {"files": len(first), "reference": first_name, "differ": {}}
    for name, hashes in runs.items():
        differ = sorted(path for path in first if hashes.get(path) != first[path])
        result["differ"][name] = differ
        print(f"{name}: {len(first) - len(differ)} of {len(first)} files identical to {first_name}"
              + (f"; differ: {', '.join(differ)}" if differ else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
