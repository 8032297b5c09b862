"""What the export gives up by not folding constants: file size, onnxruntime load and run time, parity.

stages/deploy/onnx_model.py exports with torch's constant folding off, so that model.onnx is the same
bytes on every CPU (bench/cross_cpu_check.py): the folding folds each BatchNorm into its convolution
with a float32 square root, which torch computes with MKL's vector math (mkl_vml_kernel_sSqrt, not
correctly rounded), whose result differs between CPUs. This compares, per model, three files:

- `torch folding`: the export as it was (do_constant_folding=True; other bytes on another CPU);
- `unfolded`: export_onnx as it is (the BatchNorms stay; onnxruntime folds them when it loads);
- `float64 fold`: the unfolded file with each Conv -> BatchNormalization pair folded here, in float64
  and rounded once to float32 (the same bytes everywhere too; the alternative that was weighed).

For each: file bytes, graph nodes, nodes once onnxruntime's basic optimisations ran (what it runs),
session creation and ms per image in CPU time of one thread (CPU time, so that other processes on
a shared machine disturb it less; the medians of --rounds interleaved rounds of 20 images), and
parity with the torch runtime on the test images (stages/deploy/parity.py). Two projects: the
tiny one of tests/test_predict.py (48 px) and the default input size (224 px) with params.yaml's
patchcore_effnet and knn_effnet, fitted on a small synthetic carpet.

    .venv/bin/python bench/export_folding.py --json bench/results/export_folding.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # the parity check's progress bars

# the repository's packages before numpy and torch: importing `stages` sets the numerics environment
from stages.core import numerics  # noqa: E402
from stages.core.paths import pixels_dir  # noqa: E402
from stages.data.prepared import load_split  # noqa: E402
from stages.deploy.onnx_model import OnnxModel, export_onnx  # noqa: E402
from stages.deploy.parity import parity  # noqa: E402
from stages.deploy.torch_model import FittedModel  # noqa: E402
from tests.conftest import MODELS_FITTED, call_stage, default_params, write_params  # noqa: E402

VARIANTS = ("torch folding", "unfolded", "float64 fold")


def build(folder: Path, size: str) -> list[str]:
    """A project with fitted and evaluated models; their names."""
    params = default_params()
    params.update(device="cpu", fit_seeds=[0], numerics="strict")
    params["evaluate"]["bootstrap"]["resamples"] = 20
    if size == "tiny":
        params["data"]["synthetic"].update(image_size=64, n_train=8, n_test_good=2, n_test_per_cell=1,
                                           defect_types=["color", "hole"])
        params["data"]["synthetic"]["levels"] = params["data"]["synthetic"]["levels"][:1]
        params["preprocess"].update(resize=56, crop_size=48, val_fraction=0.25)
        params["models"] = {"pc": MODELS_FITTED["pc"],
                            "knn": {"method": "global_knn", "backbone": "efficientnet_lite0", "score": {"k": 3}}}
    else:  # the default input size (resize 256, crop 224) and models; 60 images: enough for the kNN's k = 50
        params["data"]["synthetic"].update(n_train=60, n_test_good=2, n_test_per_cell=1,
                                           defect_types=["color", "hole"])
        params["data"]["synthetic"]["levels"] = params["data"]["synthetic"]["levels"][:1]
        params["models"] = {name: params["models"][name] for name in ("patchcore_effnet", "knn_effnet")}
    folder.mkdir()
    write_params(folder, params)
    for stage, args in [("download", ()), ("preprocess", ()), ("extract", ("efficientnet_lite0",))]:
        call_stage(stage, "carpet", *args, cwd=folder)
    for name in params["models"]:
        for stage in ("fit", "evaluate"):
            call_stage(stage, "carpet", name, cwd=folder)
    return list(params["models"])


def export_with_torch_folding(fitted: FittedModel, path: Path) -> None:
    import torch

    export = torch.onnx.export
    with mock.patch.object(torch.onnx, "export", lambda *a, **k: export(*a, **{**k, "do_constant_folding": True})):
        export_onnx(fitted, path)


def fold_batch_norms(path: Path) -> None:
    """Each BatchNormalization whose input is a Conv read by nothing else, folded into that Conv in float64."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    made_by = {output: node for node in graph.node for output in node.output}
    for bn in [node for node in graph.node if node.op_type == "BatchNormalization"]:
        conv = made_by.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers[conv.output[0]] != 1:
            continue
        if not all(name in weights for name in [*bn.input[1:5], *conv.input[1:]]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(weights[n]).astype(np.float64) for n in bn.input[1:5])
        w = numpy_helper.to_array(weights[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(weights[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        scale = gamma / np.sqrt(var + np.float64(np.float32(eps)))
        names = (f"{bn.output[0]}.folded_weight", f"{bn.output[0]}.folded_bias")
        graph.initializer.append(numpy_helper.from_array((w * scale.reshape(-1, 1, 1, 1)).astype(np.float32), names[0]))
        graph.initializer.append(numpy_helper.from_array(((b - mean) * scale + beta).astype(np.float32), names[1]))
        conv.input[1:] = names
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(path))


def session(path: Path, threads: int, optimised: Path | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if optimised is not None:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimised)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(project: Path, name: str, folder: Path, rounds: int) -> dict:
    import numpy as np
    import onnx

    os.chdir(project)
    fitted = FittedModel.load("carpet", name)
    test = load_split(pixels_dir("carpet") / "test.npz")
    image = {"image": np.ascontiguousarray(test.images[:1])}
    paths = {variant: folder / f"{name}-{variant.replace(' ', '_')}.onnx" for variant in VARIANTS}
    export_with_torch_folding(fitted, paths["torch folding"])
    export_onnx(fitted, paths["unfolded"])
    export_onnx(fitted, paths["float64 fold"])
    fold_batch_norms(paths["float64 fold"])
    found = {}
    for variant, path in paths.items():
        optimised = path.with_suffix(".ort-basic.onnx")
        session(path, 1, optimised)
        checked = parity(fitted, OnnxModel(path, "carpet", name), test.images, test.names)
        found[variant] = {
            "bytes": path.stat().st_size,
            "nodes": len(onnx.load(str(path)).graph.node),
            "nodes_as_run": len(onnx.load(str(optimised)).graph.node),
            "parity": {key: value for key, value in checked.items() if key != "images"},
            "session_cpu_ms": [], "cpu_ms_per_image": [],
        }
    for _ in range(rounds):  # interleaved, so that a change of load falls on every variant alike
        for variant, path in paths.items():
            start = time.process_time()
            run = session(path, 1)
            found[variant]["session_cpu_ms"].append((time.process_time() - start) * 1e3)
            for _ in range(3):
                run.run(None, image)
            start = time.process_time()
            for _ in range(20):
                run.run(None, image)
            found[variant]["cpu_ms_per_image"].append((time.process_time() - start) * 1e3 / 20)
    for result in found.values():
        for key in ("session_cpu_ms", "cpu_ms_per_image"):
            result[key] = round(statistics.median(result[key]), 2)
    return {"model": name, "input": list(fitted.input_size), "variants": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    out = args.json.resolve() if args.json else None
    numerics.configure_torch()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in ("tiny", "default"):
            project = Path(tmp) / size
            for name in build(project, size):
                results.append(measure(project, name, Path(tmp), args.rounds))
                for variant, found in results[-1]["variants"].items():
                    print(f"{name} {results[-1]['input']} {variant}: {found['bytes']:,} bytes, {found['nodes']} nodes "
                          f"({found['nodes_as_run']} as onnxruntime runs it), session {found['session_cpu_ms']} ms, "
                          f"{found['cpu_ms_per_image']} ms per image (CPU, 1 thread), scores within "
                          f"{found['parity']['score_rel']:.1e} of torch", flush=True)
    load = os.getloadavg()
    record = {"numerics": numerics.describe(), "load_average_1_5_15": [round(x, 2) for x in load], "models": results}
    if out:
        out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
