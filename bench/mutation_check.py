"""Mutation check of the tests: apply each mutation to the code, run the test that should catch it, revert.

    .venv/bin/python bench/mutation_check.py       # KILLED = the test failed, as it should; SURVIVED = a weak test

Each mutation breaks one named behaviour (the threshold rule, eq. 7, AUPRO's fpr_limit, the stratified
bootstrap, exit codes, weights_only, exact_sqrt, the benchmark grouping, the export's single block,
the colour scale, the fitted check, scipy's smoothing, torch's antialiased resize, predict's single
bar, the demo's --device check and model list, the export's CPU); the file is restored afterwards
whatever happens. Do not run it beside anything that reads stages/ (the suite, dvc repro): the files
are changed while each test runs. The tests run with this interpreter (a worktree has no .venv).
"""
import subprocess
import sys
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
        "stages/evaluation/threshold.py",
        "return np.asarray(scores, dtype=np.float64) >= threshold",
        "return np.asarray(scores, dtype=np.float64) > threshold",
        ["tests/test_threshold.py", "tests/test_metrics.py", "tests/test_figures.py"],
    ),
    (
        "the demo's verdict re-typed as >",
        "stages/demo.py",
        "bool(flagged(score, model.threshold))",
        "score > model.threshold",
        ["tests/test_threshold.py"],
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
        "stages/methods/neighbours.py",
        "whole = len(queries) <= rows or torch.onnx.is_in_onnx_export()",
        "whole = len(queries) <= rows",
        ["tests/test_predict.py", "-k", "blocks_exports"],
    ),
    (
        "save skips the fitted check",
        "stages/methods/base.py",
        "        self._require_fitted()  # before the folder: an unfitted model leaves nothing behind\n",
        "",
        ["tests/test_methods.py", "-k", "unfitted"],
    ),
    (
        "smoothing truncated at 3 sigma, not scipy's 4",
        "stages/methods/maps.py",
        "TRUNCATE = 4.0",
        "TRUNCATE = 3.0",
        ["tests/test_maps.py"],
    ),
    (
        "resize without antialiasing",
        "stages/methods/maps.py",
        "align_corners=False, antialias=True)",
        "align_corners=False, antialias=False)",
        ["tests/test_maps.py"],
    ),
    (
        "predict's features draw their own bar",
        "stages/deploy/torch_model.py",
        "extracted = self.extractor(images, batch_size=16, progress=False)",
        "extracted = self.extractor(images, batch_size=16)",
        ["tests/test_progress.py", "-k", "predict_draws"],
    ),
    (
        "the demo's --device unchecked at start",
        "stages/demo.py",
        'device = resolve_device(args.device, "--device")',
        "device = args.device",
        ["tests/test_demo_start.py", "-k", "bad_device"],
    ),
    (
        "the demo reads models/ on every request",
        "stages/demo.py",
        "        if name not in self.names:",
        "        if name not in fitted_models():",
        ["tests/test_demo_start.py", "-k", "model_list"],
    ),
    (
        "export resolves params' device",
        "stages/export.py",
        'model_from_argv("export", device="cpu")',
        'model_from_argv("export")',
        ["tests/test_progress.py", "-k", "export"],
    ),
]
for name, rel, old, new, args in M:
    path = ROOT / rel
    original = path.read_text()
    assert original.count(old) == 1, (name, original.count(old))
    try:
        path.write_text(original.replace(old, new))
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n0", "-x", "-p", "no:cacheprovider", *args],
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
