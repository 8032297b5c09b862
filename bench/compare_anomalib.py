"""Our PatchCore against anomalib's, side by side on the same images and the same EfficientNet-Lite0 weights.

Needs a separate venv outside the repo with anomalib (benchmark only, not in requirements.txt):

    python3.11 -m venv ../anomalib-venv
    ../anomalib-venv/bin/pip install -r bench/requirements-anomalib.txt
    ../anomalib-venv/bin/python bench/compare_anomalib.py --n-train 20                 # validate first
    ../anomalib-venv/bin/python bench/compare_anomalib.py --n-train 100 --ours-dims 128 1024
    ../anomalib-venv/bin/python bench/compare_anomalib.py --n-train 200 --ours-dims 128 1024   # ~40 min of anomalib fit
    ../anomalib-venv/bin/python bench/compare_anomalib.py --n-train 391 --ours-dims 128 1024 --anomalib-bank random
    # every runtime each side deploys with: ours in torch and onnxruntime, anomalib eager and its own exports
    ../anomalib-venv/bin/python bench/compare_anomalib.py --n-train 391 --ours-dims 128 --onnx --anomalib-bank random \
        --anomalib-export

What runs: a synthetic carpet category (stages.data.synthetic: --n-train good training images, 20
good + 8 per defect type test images, exact masks), preprocessed at 256 px (resize 256, crop 256)
with the pipeline's code. Every job runs in its own process (so its peak RSS is its own), from the
same uint8 images, normalised for Lite0 ((x - 0.5) / 0.5, TF-Lite's preprocessing):

- ours, as the pipeline runs it, in three processes: the extract stage (stages.features.backbones.
  FeatureExtractor: timm tf_efficientnet_lite0 with the packaged weights, hooks on blocks.2 +
  blocks.4; features saved to a file), the fit stage (features loaded, stages.methods.patchcore.
  PatchCore fitted, coreset 0.1, pretrain = target embed dimension = each --ours-dims value; no
  backbone in this process) and scoring (backbone on the test images + the saved bank). Fit time =
  extract + fit; "fit peak RSS" is the fit stage's process, "extract peak RSS" the extract's.
  Image score = max patch score (our default, reweight false); the eq. 7 reweighted image AUROC
  (9 neighbours, what anomalib does) is reported too, from a second, untimed scoring.
- anomalib: anomalib.models.image.patchcore.torch_model.PatchcoreModel built with its own timm path
  (backbone="tf_efficientnet_lite0", pre_trained=False, layers blocks.2 + blocks.4: timm's
  features_only model, out_indices 2 and 3), then our Lite0 state dict loaded into that
  feature extractor (no key missing; only the unused head is left out). Giving PatchcoreModel the
  nn.Module itself does not work: anomalib then traces it with torch.fx, which fails on the TF
  "same" padding of the tf_ variant. Fit = what anomalib's Lightning Patchcore does in
  training_step + fit (forward in train mode to fill embedding_store, then
  subsample_embedding(0.1): KCenterGreedy on a sparse random projection); scoring = forward in
  eval mode (nearest neighbour, eq. 7 with num_neighbors 9, bilinear upsampling + Gaussian blur
  sigma 4). Its patch feature is the concatenation 40 + 112 = 152-d (no MeanMapper/Aggregator).
- --anomalib-bank random (latency only; default greedy, the above): the same PatchcoreModel, the
  same training forward filling embedding_store, but subsample_embedding is not called: the memory
  bank is a uniformly random subset (torch.randperm, seed 0) of the training patch embeddings, of
  exactly the size KCenterGreedy would select (its own coreset_size: int(N x coreset ratio)), so
  the bank has the greedy bank's shape without the greedy's cost (~35 min at 200 training images).
  Scoring is unchanged and timed the same way; its time depends only on the bank's shape. The row
  is named "anomalib <version> (random bank, latency only)"; its fit time, image/pixel AUROC and
  AUPRO are "-" (not anomalib's, not computed), its peak RSS is the process's up to the random bank
  (embedding_store included, KCenterGreedy's projection and distances not), and the ratios table
  uses it for the ms / test image ratios only.

- --anomalib-export: anomalib's deployed model as its users get it: the same fitted PatchcoreModel (its
  bank saved by the job above) inside anomalib's Lightning Patchcore, exported by anomalib's own
  to_onnx (torch's dynamo exporter; anomalib 2.7 has no other) and to_openvino (that ONNX through
  openvino.convert_model), scored in onnxruntime and in OpenVINO on the CPU with their defaults (every
  core), except OpenVINO's precision, held at float32 like every other row (on a CPU with
  AVX512_BF16 it picks bfloat16, and there anomalib's average pooling did not compile). The graph holds
  a pre-processor of Lite0's normalisation alone (the images are 256 px already) and no post-processor,
  so it returns the raw score and map. The exporter fixed the batch dimension at its example's (2),
  so these rows score batches of 2. "Runtime for runtime" then sets ours in torch beside anomalib in
  torch and ours in onnxruntime beside anomalib's export in onnxruntime, OpenVINO beside them.

Both children run with the same glibc setting MALLOC_MMAP_THRESHOLD_ (--malloc-mmap-threshold, default
1 MiB; 0 leaves glibc's default): with glibc's default dynamic threshold, anomalib's KCenterGreedy
(one fresh N x ~250 float32 difference per selected point) fragmented the heap and its RSS grew by
up to ~17 MiB per step (one run at 20 training images was OOM-killed at 23.6 GB RSS; at a fixed
1 MiB threshold the same fit stays at ~1.1 GB). A watchdog ends a child whose RSS passes
--max-rss-gib, so the machine is never driven out of memory.

Fit time includes the backbone on the training images for both, scoring time the backbone on the
test images; "PatchCore only" columns give ours without the backbone. anomalib's fit is one process
(backbone and coreset cannot be separated there), so its fit peak RSS includes the backbone.
Metrics (image AUROC, pixel AUROC, AUPRO up to FPR 0.3) come from stages.evaluation.metrics for both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402

BATCH = 8  # images per forward pass, fit and scoring, both implementations (our fit/score batch_size default)


def _tensor(images):
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    return (x - 0.5) / 0.5  # stages.features.backbones: efficientnet_lite0 mean = std = 0.5


def run_ours_extract(workdir: Path) -> dict:
    """Our extract stage: the backbone on the training images, features cached to a file."""
    from stages.features.cache import save_features

    train = bench_data.load(workdir, "train")
    backbone = bench_data.lite0_model()
    start = time.perf_counter()
    save_features(workdir / "ours_train.features", bench_data.extract(train, backbone, BATCH))
    return {
        "extract_s": round(time.perf_counter() - start, 1),
        "extract_peak_rss_mib": round(bench_data.peak_rss_mib()),
    }


def run_ours_fit(workdir: Path, dim: int, coreset_ratio: float) -> dict:
    """Our fit stage: cached features in, memory bank out; a process that never loads the backbone."""
    import torch

    from stages.features.cache import load_features
    from stages.methods.patchcore import PatchCore

    torch.manual_seed(0)
    baseline = bench_data.peak_rss_mib()
    model = PatchCore(
        fit={
            "coreset_ratio": coreset_ratio,
            "pretrain_embed_dimension": dim,
            "target_embed_dimension": dim,
            "batch_size": BATCH,
        }
    )
    start = time.perf_counter()
    model.fit(load_features(workdir / "ours_train.features"))
    fit_s = time.perf_counter() - start
    model.save(workdir / f"ours_{dim}.model")
    peak = bench_data.peak_rss_mib()
    return {
        "bank": list(model.bank.shape),
        "fit_patchcore_only_s": round(fit_s, 1),
        "fit_peak_rss_mib": round(peak),
        "added_by_fit_mib": round(peak - baseline),
    }


def run_ours_score(workdir: Path, dim: int, num_neighbors: int) -> dict:
    """Our predict path: the backbone on the test images, then the fitted bank's nearest-neighbour
    scoring, timed with the max patch score (our default) and with eq. 7 (anomalib's)."""
    from stages.methods.patchcore import PatchCore

    test = bench_data.load(workdir, "test")
    backbone = bench_data.lite0_model()
    model = PatchCore.load(workdir / f"ours_{dim}.model", score={"num_neighbors": num_neighbors, "batch_size": BATCH})
    start = time.perf_counter()
    test_features = bench_data.extract(
        test, backbone, BATCH, with_global=False
    )  # predict's backbone, cut after blocks.4
    test_extract_s = time.perf_counter() - start
    prediction = model.predict(test_features)
    score_s = time.perf_counter() - start
    result = bench_data.metrics(test, prediction.image_scores, prediction.anomaly_maps)
    reweighted = PatchCore.load(
        workdir / f"ours_{dim}.model", score={"num_neighbors": num_neighbors, "batch_size": BATCH, "reweight": True}
    )
    start = time.perf_counter()
    eq7_scores = reweighted.predict(test_features).image_scores
    eq7_s = time.perf_counter() - start + test_extract_s
    eq7 = bench_data.metrics(test, eq7_scores, prediction.anomaly_maps)
    return {
        **result,
        "image_auroc_eq7": eq7["image_auroc"],
        "score_ms_per_image": round(1000 * score_s / len(test), 1),
        "score_eq7_ms_per_image": round(1000 * eq7_s / len(test), 1),
        "score_patchcore_only_ms_per_image": round(1000 * (score_s - test_extract_s) / len(test), 1),
    }


def run_ours_onnx_score(workdir: Path, dim: int, num_neighbors: int) -> dict:
    """Our deployed path: the fitted bank exported as the export stage does (backbone cut after blocks.4,
    PatchCore's scorer, one ONNX graph; stages/deploy/torch_model.py), scored in onnxruntime as predict
    --runtime onnx and the demo do. The export itself is not timed."""
    from stages.deploy.onnx_model import OnnxModel, export_onnx
    from stages.deploy.overlay import ColourScale
    from stages.deploy.torch_model import FittedModel
    from stages.methods.patchcore import PatchCore

    test = bench_data.load(workdir, "test")
    model = PatchCore.load(workdir / f"ours_{dim}.model", score={"num_neighbors": num_neighbors, "batch_size": BATCH})
    size = int(test.images.shape[1])
    fitted = FittedModel(
        "bench",
        f"ours_{dim}",
        model,
        {"resize": size, "crop_size": size},
        {"name": bench_data.ARCH, "arch": bench_data.ARCH, "layers": list(bench_data.LAYERS), "weights": None},
        0.0,
        ColourScale(0.0, 1.0),
        0,
    )
    path = workdir / f"ours_{dim}.export" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(fitted, path)
    onnx_model = OnnxModel(path, "bench", f"ours_{dim}")
    onnx_model.score(test.images[:2], test.names[:2])  # warm-up, as the torch path's first batch is
    start = time.perf_counter()
    prediction = onnx_model.score(test.images, test.names)
    score_s = time.perf_counter() - start
    return {
        **bench_data.metrics(test, prediction.image_scores, prediction.anomaly_maps),
        "score_ms_per_image": round(1000 * score_s / len(test), 1),
    }


def anomalib_model(num_neighbors: int):
    """anomalib's PatchcoreModel, its timm feature extractor holding our Lite0 weights."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(
        layers=list(bench_data.LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=num_neighbors
    )
    timm_features = model.feature_extractor.feature_extractor  # timm EfficientNetFeatures, out_indices (2, 3)
    loaded = timm_features.load_state_dict(bench_data.lite0_model().state_dict(), strict=False)
    if loaded.missing_keys:
        raise RuntimeError(f"Lite0 weights do not cover anomalib's extractor: missing {loaded.missing_keys}")
    unused = {k.split(".")[0] for k in loaded.unexpected_keys}
    if unused - {"conv_head", "bn2", "classifier"}:
        raise RuntimeError(f"unexpected Lite0 keys left unused: {sorted(unused)}")
    return model


def random_bank(model, coreset_ratio: float) -> None:
    """--anomalib-bank random: instead of model.subsample_embedding, a uniformly random subset (seed 0) of
    the stored training patch embeddings, as many as anomalib's KCenterGreedy would select."""
    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    if len(model.embedding_store) == 0:
        raise ValueError("Embedding store is empty. Cannot build the memory bank.")
    embedding = torch.vstack(model.embedding_store)  # as subsample_embedding
    model.embedding_store.clear()
    size = KCenterGreedy(embedding=embedding, sampling_ratio=coreset_ratio).coreset_size  # its rounding, its checks
    index = torch.randperm(embedding.shape[0], generator=torch.Generator().manual_seed(0))[:size]
    model.memory_bank = embedding[index]


def run_anomalib(workdir: Path, coreset_ratio: float, num_neighbors: int, bank: str = "greedy") -> dict:
    import anomalib
    import numpy as np
    import torch

    torch.manual_seed(0)  # KCenterGreedy's first centre and the projection's signs: torch's global RNG
    np.random.seed(0)  # the projection's column choice: sklearn's sample_without_replacement(random_state=None)
    train, test = bench_data.load(workdir, "train"), bench_data.load(workdir, "test")
    model = anomalib_model(num_neighbors)
    baseline = bench_data.peak_rss_mib()
    start = time.perf_counter()
    model.train()
    for i in range(0, len(train), BATCH):  # Patchcore.training_step
        model(_tensor(train.images[i : i + BATCH]))
    if bank == "random":
        random_bank(model, coreset_ratio)  # latency only: the greedy bank's shape, not its points
    else:
        model.subsample_embedding(coreset_ratio)  # Patchcore.fit
    fit_s = time.perf_counter() - start
    fit_peak = bench_data.peak_rss_mib()
    torch.save(model.memory_bank, workdir / "anomalib_bank.pt")  # for its exported model (--anomalib-export)
    model.eval()
    scores, maps = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(test), BATCH):
            out = model(_tensor(test.images[i : i + BATCH]))
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(-1, *test.image_size))
    score_s = time.perf_counter() - start
    scores = torch.cat(scores).double().numpy()
    maps = torch.cat(maps).float().numpy()
    latency_only = bank == "random"
    return {
        "impl": f"anomalib {anomalib.__version__}" + (" (random bank, latency only)" if latency_only else ""),
        "anomalib_bank": bank,
        "bank": list(model.memory_bank.shape),
        **(
            {"image_auroc": None, "pixel_auroc": None, "aupro": None}
            if latency_only
            else bench_data.metrics(test, scores, maps)
        ),
        "image_auroc_eq7": None,
        "fit_s": None if latency_only else round(fit_s, 1),
        "fit_patchcore_only_s": None,
        "score_ms_per_image": round(1000 * score_s / len(test), 1),
        "score_patchcore_only_ms_per_image": None,
        "fit_peak_rss_mib": round(fit_peak),
        "added_by_fit_mib": round(fit_peak - baseline),
        "extract_peak_rss_mib": None,
    }


RUNTIMES = {"onnx": "onnxruntime", "openvino": "OpenVINO"}


def run_anomalib_export(workdir: Path, num_neighbors: int, runtime: str, bank: str) -> dict:
    """anomalib's deployed path: the PatchcoreModel the anomalib job fitted (its memory bank, saved there)
    inside anomalib's Lightning Patchcore, exported by anomalib's own to_onnx or to_openvino (the dynamo
    exporter; anomalib asks for opset 14 and a dynamic batch dimension, the exporter wrote opset 18 and fixed
    the batch at 2), then scored in onnxruntime or OpenVINO on the CPU with their default settings (every
    core; OpenVINO at float32). The pre-processor in the graph is Lite0's normalisation alone (the
    images are 256 px already, as for the other rows); no post-processor, so the graph returns the raw
    score and map, as the eager row scores them. The export itself is not timed; one batch warms up."""
    import anomalib
    import numpy as np
    import torch
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    test = bench_data.load(workdir, "test")
    module = Patchcore(backbone="tf_efficientnet_lite0", layers=list(bench_data.LAYERS), pre_trained=False,
                       num_neighbors=num_neighbors, pre_processor=PreProcessor(v2.Normalize([0.5] * 3, [0.5] * 3)),
                       post_processor=False, evaluator=False, visualizer=False)
    module.model = anomalib_model(num_neighbors)
    module.model.memory_bank = torch.load(workdir / "anomalib_bank.pt")
    export_root = workdir / f"anomalib_{runtime}"
    if runtime == "onnx":
        import onnxruntime

        path = module.to_onnx(export_root, input_size=tuple(test.image_size))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        batch_size = session.get_inputs()[0].shape[0]

        def infer(batch):
            return dict(zip(outputs, session.run(None, {session.get_inputs()[0].name: batch})))
        version = onnxruntime.__version__
    else:
        import openvino

        path = module.to_openvino(export_root, input_size=tuple(test.image_size))
        # float32, as every other row: OpenVINO picks bfloat16 on a CPU with AVX512_BF16 (this EPYC), where
        # anomalib's average pooling did not compile
        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        batch_dim = compiled.inputs[0].get_partial_shape()[0]
        batch_size = batch_dim.get_length() if batch_dim.is_static else None

        def infer(batch):
            result = compiled(batch)
            return {port.get_any_name(): result[port] for port in compiled.outputs}
        version = openvino.__version__.split("-")[0]
    images = (test.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)  # anomalib's input: [0, 1] floats
    # the exporter may fix the batch dimension at its example's (2 here, although anomalib asks for it dynamic):
    # batches of that size, the last one filled up with copies of its last image and those results dropped
    batch = batch_size if isinstance(batch_size, int) and batch_size > 0 else BATCH
    padded = np.concatenate([images, np.repeat(images[-1:], -len(images) % batch, axis=0)])
    infer(padded[:batch])
    scores, maps = [], []
    start = time.perf_counter()
    for i in range(0, len(padded), batch):
        out = infer(padded[i : i + batch])
        scores.append(np.asarray(out["pred_score"]).reshape(-1))
        maps.append(np.asarray(out["anomaly_map"]).reshape(-1, *test.image_size))
    score_s = time.perf_counter() - start
    scores, maps = np.concatenate(scores)[: len(images)], np.concatenate(maps)[: len(images)]
    latency_only = bank == "random"
    return {
        "impl": f"anomalib {anomalib.__version__}, its {RUNTIMES[runtime]} export ({RUNTIMES[runtime]} {version})"
        + (" (random bank, latency only)" if latency_only else ""),
        "anomalib_bank": bank,
        "bank": list(module.model.memory_bank.shape),
        "batch": batch,
        **(
            {"image_auroc": None, "pixel_auroc": None, "aupro": None}
            if latency_only
            else bench_data.metrics(test, scores.astype(np.float64), maps)
        ),
        "image_auroc_eq7": None,
        "fit_s": None,
        "fit_patchcore_only_s": None,
        "score_ms_per_image": round(1000 * score_s / len(test), 1),
        "score_patchcore_only_ms_per_image": None,
        "fit_peak_rss_mib": None,
        "added_by_fit_mib": None,
        "extract_peak_rss_mib": None,
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) and digits else str(value)


def _watchdog(max_rss_gib: float) -> None:
    """End this process (exit 3) if its RSS passes the limit: an OOM kill could take other jobs with it."""
    import threading

    import psutil

    def watch():
        process = psutil.Process()
        while True:
            rss = process.memory_info().rss
            if rss > max_rss_gib * 2**30:
                print(f"RSS {rss / 2**30:.1f} GiB > --max-rss-gib {max_rss_gib}: stopped", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def _peak_any(row: dict) -> int:
    """The largest peak RSS of the implementation's processes: ours, the extract stage's or the fit stage's."""
    return max(row["fit_peak_rss_mib"], row.get("extract_peak_rss_mib") or 0)


def print_tables(rows: list[dict]) -> None:
    """The side-by-side table and the ratios ours / anomalib (also: --tables-from a saved --json)."""
    print(
        "| implementation | bank | fit (s) | PatchCore-only fit (s) | ms / test image | ms / test image, eq. 7 | "
        "PatchCore-only ms / image | fit peak RSS (MiB) | added by fit (MiB) | extract peak RSS (MiB) | "
        "image AUROC | image AUROC eq. 7 | pixel AUROC | AUPRO | load avg before fit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        eq7_ms = r.get("score_eq7_ms_per_image") if r.get("extract_peak_rss_mib") else r["score_ms_per_image"]
        print(
            f"| {r['impl']} | {r['bank'][0]} x {r['bank'][1]} | {_fmt(r['fit_s'], 0)} | "
            f"{_fmt(r['fit_patchcore_only_s'], 0)} | "
            f"{r['score_ms_per_image']} | {_fmt(eq7_ms, 0)} | {_fmt(r['score_patchcore_only_ms_per_image'], 0)} | "
            f"{_fmt(r['fit_peak_rss_mib'])} | {_fmt(r['added_by_fit_mib'])} | {_fmt(r['extract_peak_rss_mib'])} | "
            f"{_fmt(r['image_auroc'])} | {_fmt(r['image_auroc_eq7'])} | {_fmt(r['pixel_auroc'])} | "
            f"{_fmt(r['aupro'])} | "
            f"{r['loadavg_before']} |"
        )
    theirs = next((r for r in rows if r["impl"].startswith("anomalib")), None)
    if not theirs:
        return
    latency_only = theirs.get("anomalib_bank") == "random"  # rows saved before the option: greedy
    print(
        "\nRatios ours / anomalib (anomalib's fit RSS includes its backbone, in the same process"
        + ("; its random bank: ms / image ratios only" if latency_only else "")
        + "):\n"
    )
    print(
        "| implementation | fit time | ms / test image | ms / test image, both eq. 7 | fit peak RSS | "
        "peak RSS, extract or fit | image AUROC | pixel AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["impl"].startswith("anomalib"):
            continue
        ratio = lambda ours, base, d=2: "-" if ours is None or base is None else f"{ours / base:.{d}f}"  # noqa: E731
        other = (lambda ours, base, d=2: "-") if latency_only else ratio  # noqa: E731 (every ratio but ms / image)
        print(
            f"| {r['impl']} | {other(r['fit_s'], theirs['fit_s'])} | "
            f"{ratio(r['score_ms_per_image'], theirs['score_ms_per_image'])} | "
            f"{ratio(r.get('score_eq7_ms_per_image'), theirs['score_ms_per_image'])} | "
            f"{other(r['fit_peak_rss_mib'], theirs['fit_peak_rss_mib'])} | {other(_peak_any(r), _peak_any(theirs))} | "
            f"{other(r['image_auroc'], theirs['image_auroc'], 4)} | "
            f"{other(r['pixel_auroc'], theirs['pixel_auroc'], 4)} |"
        )
    print_runtime_for_runtime(rows)


def print_runtime_for_runtime(rows: list[dict]) -> None:
    """ms / test image, each implementation in each runtime it deploys with: ours in torch (predict's
    default) and in onnxruntime (its export, the demo's default); anomalib in torch (eager) and through its
    own exports in onnxruntime and OpenVINO. The ratio compares the same runtime."""
    theirs = {("onnxruntime" if "onnxruntime export" in r["impl"] else "OpenVINO" if "OpenVINO export" in r["impl"]
               else "torch"): r for r in rows if r["impl"].startswith("anomalib")}
    if len(theirs) < 2:
        return
    print("\nRuntime for runtime, ms / test image (backbone included; ratio: ours / anomalib in the same runtime):\n")
    print("| ours | runtime | ours ms | anomalib ms | ours / anomalib |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["impl"].startswith("anomalib"):
            continue
        runtime = "onnxruntime" if r["impl"].endswith("onnxruntime") else "torch"
        base = theirs.get(runtime)
        if base:
            print(f"| {r['impl']} | {runtime} | {r['score_ms_per_image']} | {base['score_ms_per_image']} | "
                  f"{r['score_ms_per_image'] / base['score_ms_per_image']:.2f} |")
    if "OpenVINO" in theirs:
        print(f"| - | OpenVINO (anomalib only) | - | {theirs['OpenVINO']['score_ms_per_image']} | - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-test-per-cell", type=int, default=2, help="test images per defect type and level")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--ours-dims", type=int, nargs="+", default=[1024], help="our embed dimension(s)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--skip-anomalib", action="store_true")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also score ours through its ONNX export in onnxruntime (the demo's default runtime)",
    )
    parser.add_argument(
        "--anomalib-export",
        action="store_true",
        help="also score anomalib's own exports: its to_onnx in onnxruntime, its to_openvino in OpenVINO",
    )
    parser.add_argument(
        "--anomalib-bank",
        choices=["greedy", "random"],
        default="greedy",
        help="anomalib's memory bank: its KCenterGreedy coreset, or (latency only) a seeded random "
        "subset of the same size",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=2**20,
        help="MALLOC_MMAP_THRESHOLD_ for both children, bytes (0: glibc's dynamic default)",
    )
    parser.add_argument("--max-rss-gib", type=float, default=12.0, help="a child above this RSS is stopped")
    parser.add_argument("--workdir", type=Path, help="default /tmp/patchcore-bench/compare_n<N>")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--tables-from", type=Path, help="only print the tables of rows saved with --json")
    parser.add_argument(
        "--one", help=argparse.SUPPRESS
    )  # internal: "anomalib", "anomalib-export:<onnx|openvino>", "ours-extract", "ours-fit:<dim>", "ours-score:<dim>"
    args = parser.parse_args()
    if args.tables_from:
        print_tables(json.loads(args.tables_from.read_text()))
        return
    workdir = args.workdir or Path(f"/tmp/patchcore-bench/compare_n{args.n_train}")
    if args.one:
        _watchdog(args.max_rss_gib)
        job, _, dim = args.one.partition(":")
        if job == "anomalib":
            row = run_anomalib(workdir, args.coreset_ratio, args.num_neighbors, args.anomalib_bank)
        elif job == "ours-extract":
            row = run_ours_extract(workdir)
        elif job == "ours-fit":
            row = run_ours_fit(workdir, int(dim), args.coreset_ratio)
        elif job == "anomalib-export":
            row = run_anomalib_export(workdir, args.num_neighbors, dim, args.anomalib_bank)
        elif job == "ours-onnx-score":
            row = run_ours_onnx_score(workdir, int(dim), args.num_neighbors)
        else:
            row = run_ours_score(workdir, int(dim), args.num_neighbors)
        print(json.dumps(row))
        return

    size = args.image_size
    bench_data.prepare(workdir, args.n_train, args.n_test_good, args.n_test_per_cell, size, size, size)

    def child(job: str) -> dict:
        """One job in its own process, so its peak RSS is its own."""
        load = bench_data.loadavg()
        cmd = [
            sys.executable,
            __file__,
            "--one",
            job,
            "--workdir",
            str(workdir),
            "--coreset-ratio",
            str(args.coreset_ratio),
            "--num-neighbors",
            str(args.num_neighbors),
            "--max-rss-gib",
            str(args.max_rss_gib),
            "--anomalib-bank",
            args.anomalib_bank,
        ]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{job} failed:\n{out.stderr[-5000:]}")
        result = {**json.loads(out.stdout.strip().splitlines()[-1]), "loadavg_before": load}
        print(job, result, file=sys.stderr, flush=True)
        return result

    # Ours as the pipeline runs it: extract stage (backbone, features cached), fit stage (features ->
    # bank, no backbone), then scoring (backbone on the test images + nearest-neighbour search).
    rows = []
    if args.ours_dims:
        extract = child("ours-extract")
    for dim in args.ours_dims:
        fit = child(f"ours-fit:{dim}")
        score = child(f"ours-score:{dim}")
        rows.append(
            {
                "impl": f"ours, {dim}-d",
                **extract,
                **fit,
                **score,
                "fit_s": round(extract["extract_s"] + fit["fit_patchcore_only_s"], 1),
                "loadavg_before": fit["loadavg_before"],
            }
        )
        if args.onnx:
            onnx = child(f"ours-onnx-score:{dim}")
            rows.append(
                {
                    "impl": f"ours, {dim}-d, onnxruntime",
                    **extract,
                    **fit,
                    "image_auroc_eq7": None,
                    "score_eq7_ms_per_image": None,
                    "score_patchcore_only_ms_per_image": None,
                    **onnx,
                    "fit_s": rows[-1]["fit_s"],
                    "loadavg_before": onnx["loadavg_before"],
                }
            )
    if not args.skip_anomalib:
        rows.append(child("anomalib"))
        if args.anomalib_export:
            rows += [child(f"anomalib-export:{runtime}") for runtime in RUNTIMES]

    from stages.data.synthetic import DEFAULT_LEVELS

    n_test = args.n_test_good + 5 * len(DEFAULT_LEVELS) * args.n_test_per_cell
    print(
        f"\nPatchCore, ours vs anomalib: EfficientNet-Lite0 blocks.2 + blocks.4 (same weights), {size} px, "
        f"{args.n_train} train / {n_test} test images, coreset {args.coreset_ratio}, {args.num_neighbors} neighbours, "
        f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default'}"
        + (", anomalib's bank random (latency only)" if args.anomalib_bank == "random" else "")
        + "\n"
    )
    print_tables(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
