"""Mutation check of the tests: apply each mutation to the code, run the test that should catch it, revert.

    .venv/bin/python bench/mutation_check.py       # KILLED = the test failed, as it should; SURVIVED = a weak test

Each mutation breaks one named behaviour (the threshold rule, eq. 7, AUPRO's fpr_limit, the stratified
bootstrap, exit codes, weights_only, exact_sqrt, the benchmark grouping, the export's single block,
the colour scale); the file is restored afterwards whatever happens. Do not run it beside anything
that reads stages/ (the suite, dvc repro): the files are changed while each test runs.
"""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = [
    (
        "eq. 7 reweighting ignored",
        "stages/methods/patchcore.py",
        "        if self.reweight:\n",
        "        if False:\n",
        ["tests/test_methods.py::test_patchcore_eq7_reweighting_on_a_hand_made_bank"],
    ),
    (
        "threshold rule > instead of >=",
        "stages/evaluation/metrics.py",
        "return np.asarray(scores, dtype=np.float64) >= threshold",
        "return np.asarray(scores, dtype=np.float64) > threshold",
        ["tests/test_metrics.py", "tests/test_figures.py"],
    ),
    (
        "AUPRO ignores fpr_limit",
        "stages/evaluation/metrics.py",
        "return float(stats.aupro(fpr_limit)[0])",
        "return float(stats.aupro(0.3)[0])",
        ["tests/test_metrics.py"],
    ),
    (
        "colour scale from the mean, not the median",
        "stages/deploy/overlay.py",
        "low = float(np.median(val_maps))",
        "low = float(np.mean(val_maps))",
        ["tests/test_figures.py"],
    ),
    (
        "bootstrap not stratified",
        "stages/evaluation/bootstrap.py",
        "members = np.flatnonzero(labels == label)",
        "members = np.arange(len(labels))",
        ["tests/test_statistics.py"],
    ),
    ("Ctrl-C exits 1", "stages/core/cli.py", "        sys.exit(130)", "        sys.exit(1)", ["tests/test_runtime.py"]),
    (
        "torch files loaded with weights_only=False",
        "stages/core/torch_files.py",
        "weights_only=True)",
        "weights_only=False)",
        ["tests/test_hostile.py", "-k", "crafted"],
    ),
    (
        "exact_sqrt is torch's float32 sqrt",
        "stages/methods/neighbours.py",
        "return x.double().sqrt().to(x.dtype)",
        "return x.sqrt()",
        ["tests/test_methods.py", "-k", "exact_sqrt"],
    ),
    (
        "report: one benchmark group only",
        "stages/evaluation/paired.py",
        "    if len(benchmarks) > 1:\n",
        "    if False:\n",
        ["tests/test_report.py"],
    ),
    (
        "PatchCore export splits blocks",
        "stages/methods/patchcore.py",
        "whole = len(queries) <= rows or torch.onnx.is_in_onnx_export()",
        "whole = len(queries) <= rows",
        ["tests/test_predict.py", "-k", "blocks_exports"],
    ),
]
for name, rel, old, new, args in M:
    path = ROOT / rel
    original = path.read_text()
    assert original.count(old) == 1, (name, original.count(old))
    try:
        path.write_text(original.replace(old, new))
        r = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-n0", "-x", "-p", "no:cacheprovider", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
        print(
            f"{'KILLED' if r.returncode != 0 else 'SURVIVED'}: {name} ({rel}) -> "
            f"{failed[:1] or r.stdout.splitlines()[-1:]}",
            flush=True,
        )
    finally:
        path.write_text(original)
