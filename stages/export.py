"""DVC stage `export@<category>-<model>`: the first seed's fit as one ONNX graph, checked against torch.

Writes models/<category>.category/<model>.export/model.onnx: a uint8 RGB image (1, H, W, 3) at the model's input
size in, `score` (1,) and `anomaly_map` (1, H, W) out (score alone for the global kNN), with
everything in the graph (normalisation, the backbone cut after its last needed layer, the method:
PatchCore's memory bank as an initializer and nearest neighbours as a matrix product and a minimum,
kNN's bank and TopK, the autoencoders' networks, upsampling and Gaussian smoothing). The metadata
holds the threshold, the colour scale and the input recipe (stages/deployed.py), so
`python -m stages.predict --runtime onnx` and the demo need nothing else.

Before the file is moved into place, onnxruntime scores every test image of the category and the
results must equal the torch runtime's (predict's) within PARITY: the stage fails otherwise. The
differences it measured are printed, not written: they depend on the CPU's kernels, and every
output of `dvc repro` is the same bytes on every machine.
"""
from __future__ import annotations

import numpy as np

from stages.cli import run_main
from stages.data.prepared import load_split
from stages.deployed import FittedModel, OnnxModel, export_onnx
from stages.errors import PipelineError
from stages.models import model_from_argv
from stages.outputs import atomic_path
from stages.paths import export_dir, onnx_file, pixels_dir

# onnxruntime vs torch: image scores within 1e-4 relative; anomaly maps within 1e-3 absolute plus 1e-5 of
# the value (numpy's allclose rule): a feature autoencoder's maps reach the hundreds, where float32
# arithmetic in two libraries' kernels alone differs by more than 1e-3.
SCORE_RTOL = 1e-4
MAP_ATOL, MAP_RTOL = 1e-3, 1e-5


def parity(torch_model: FittedModel, onnx_model: OnnxModel, images: np.ndarray, names: list[str]) -> dict:
    """Largest relative score difference and absolute map difference over `images`."""
    reference, exported = torch_model.score(images, names), onnx_model.score(images, names)
    scale = np.maximum(np.abs(reference.image_scores), 1e-12)
    result = {"images": len(images), "score_rel": float(np.max(np.abs(exported.image_scores - reference.image_scores) / scale))}
    if reference.anomaly_maps is not None:
        difference = np.abs(exported.anomaly_maps - reference.anomaly_maps)
        result["map_abs"] = float(difference.max())
        result["map_excess"] = float(np.max(difference - MAP_RTOL * np.abs(reference.anomaly_maps)))  # vs MAP_ATOL
        result["map_max"] = float(np.abs(reference.anomaly_maps).max())
    return result


def main() -> None:
    _, config, device = model_from_argv("export")
    if device != "cpu":
        device = "cpu"  # the graph is traced on the CPU; onnxruntime's CPU package runs it
    fitted = FittedModel.load(config.category, config.name, device=device)
    test = load_split(pixels_dir(config.category) / "test.npz")
    path = onnx_file(config.category, config.name)
    with atomic_path(export_dir(config.category, config.name)) as folder:
        folder.mkdir(parents=True)
        export_onnx(fitted, folder / path.name)
        exported = OnnxModel.from_file(folder / path.name, config.category, config.name)
        found = parity(fitted, exported, test.images, test.names)
        if found["score_rel"] > SCORE_RTOL or found.get("map_excess", 0.0) > MAP_ATOL:
            raise PipelineError(f"export@{config.stage}: onnxruntime differs from torch on the {found['images']} test "
                                f"images: scores by {found['score_rel']:.2e} relative (allowed {SCORE_RTOL:g}), maps by "
                                f"{found.get('map_abs', 0.0):.2e} absolute on values up to {found.get('map_max', 0.0):.3g} "
                                f"(allowed {MAP_ATOL:g} + {MAP_RTOL:g} x value)")
    maps = (f", maps within {found['map_abs']:.1e} absolute (values up to {found['map_max']:.3g})"
            if "map_abs" in found else "")
    size = sum(f.stat().st_size for f in path.parent.iterdir()) / 2**20
    print(f"export@{config.stage}: {path} ({size:.1f} MiB); onnxruntime equals torch on "
          f"{found['images']} test images: scores within {found['score_rel']:.1e} relative{maps}")


if __name__ == "__main__":
    run_main(main)
