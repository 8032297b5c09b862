"""DVC stage `export@<category>-<model>`: the first seed's fit as one ONNX graph, checked against torch.

Writes models/<category>.category/<model>.export/model.onnx: a uint8 RGB image (1, H, W, 3) at the model's input
size in, `score` (1,) and `anomaly_map` (1, H, W) out (score alone for the global kNN), with
everything in the graph (normalisation, the backbone cut after its last needed layer, the method:
PatchCore's memory bank as an initializer and nearest neighbours as a matrix product and a minimum,
kNN's bank and TopK, the autoencoders' networks, upsampling and Gaussian smoothing). The metadata
holds the threshold, the colour scale and the input recipe (stages/deploy/torch_model.py), so
`python -m stages.predict --runtime onnx` and the demo need nothing else.

Before the file is moved into place, onnxruntime scores every test image of the category and the
results must equal the torch runtime's (predict's) within PARITY: the stage fails otherwise. The
differences it measured are printed, not written: they depend on the CPU's kernels, and every
output of `dvc repro` is the same bytes on every machine.
"""
from __future__ import annotations

from stages.core.cli import run_main
from stages.core.errors import PipelineError
from stages.core.outputs import atomic_path
from stages.core.paths import export_dir, onnx_file, pixels_dir
from stages.data.prepared import load_split
from stages.deploy.onnx_model import OnnxModel, export_onnx
from stages.deploy.parity import MAP_ATOL, MAP_RTOL, SCORE_RTOL, parity
from stages.deploy.torch_model import FittedModel
from stages.methods.entries import model_from_argv


def main() -> None:
    # the graph is traced on the CPU and onnxruntime's CPU package runs it, whatever params.yaml `device` says
    _, config, device = model_from_argv("export", device="cpu")
    fitted = FittedModel.load(config.category, config.name, device=device)
    test = load_split(pixels_dir(config.category) / "test.npz")
    path = onnx_file(config.category, config.name)
    with atomic_path(export_dir(config.category, config.name)) as folder:
        folder.mkdir(parents=True)
        export_onnx(fitted, folder / path.name)
        exported = OnnxModel(folder / path.name, config.category, config.name)
        found = parity(fitted, exported, test.images, test.names)
        if found["score_rel"] > SCORE_RTOL or found.get("map_excess", 0.0) > MAP_ATOL:
            maps_differ = (
                f", maps by {found['map_abs']:.2e} absolute on values up to {found['map_max']:.3g} "
                f"(allowed {MAP_ATOL:g} + {MAP_RTOL:g} x value)" if "map_abs" in found else ""
            )
            raise PipelineError(
                f"export@{config.stage}: onnxruntime differs from torch on the {found['images']} test "
                f"images: scores by {found['score_rel']:.2e} relative (allowed {SCORE_RTOL:g}){maps_differ}"
            )
    maps = (
        f", maps within {found['map_abs']:.1e} absolute (values up to {found['map_max']:.3g})"
        if "map_abs" in found
        else ""
    )
    size = sum(f.stat().st_size for f in path.parent.iterdir()) / 2**20
    print(
        f"export@{config.stage}: {path} ({size:.1f} MiB); onnxruntime equals torch on "
        f"{found['images']} test images: scores within {found['score_rel']:.1e} relative{maps}"
    )


if __name__ == "__main__":
    run_main(main)
