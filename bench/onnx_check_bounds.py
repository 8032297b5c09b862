"""What the ONNX graph check (stages/deploy/onnx_graph.py) counts for realistic exports, against its bounds.

PatchCore exports of two sizes, written by export_onnx itself with random backbone weights and a random
memory bank of the real size (the counts depend on shapes only):

- EfficientNet-Lite0 at 224 px with the default bank (10% of 90 training images x 784 patches = 7,056
  rows of 128);
- WideResNet-50 at 320 px (the PatchCore paper's largest crop) with a 10% coreset of MVTec AD's largest
  category (391 images x 1,600 patches: 62,560 rows of 1,024).

For each: the file's size, the export time, the check's time, and the peak bytes and work it counts,
which MAX_PEAK_BYTES (2 GiB) and MAX_WORK (2**39) must exceed with room. The WideResNet case needs about
3 GB of memory and a minute or two:

    python bench/onnx_check_bounds.py                       # both
    python bench/onnx_check_bounds.py efficientnet_lite0    # the small one only
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {  # backbone: (crop, bank rows, bank dimension, channels of its two cached layers)
    "efficientnet_lite0": (224, 7056, 128, [40, 112]),
    "wide_resnet50_2": (320, 62560, 1024, [512, 1024]),
}


def random_backbone(arch: str, weights=None):
    import timm
    import torchvision

    if arch == "efficientnet_lite0":
        return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    return torchvision.models.get_model(arch, weights=None).eval()


def measure(arch: str, folder: Path) -> dict:
    import torch

    from stages.deploy import onnx_graph
    from stages.deploy.onnx_model import export_onnx
    from stages.deploy.overlay import ColourScale
    from stages.deploy.torch_model import FittedModel
    from stages.features import backbones
    from stages.methods.patchcore import PatchCore

    side, rows, dim, channels = CASES[arch]
    backbones.load_backbone = random_backbone  # no download: the graph's shapes do not depend on the weights
    detector = PatchCore(fit={"target_embed_dimension": dim, "pretrain_embed_dimension": dim})
    detector.set_state({"bank": torch.randn(rows, dim), "channels": channels})
    spec = backbones.BACKBONES[arch]
    fitted = FittedModel("carpet", arch, detector, {"resize": side, "crop_size": side},
                         {"name": arch, "arch": arch, "layers": list(spec.layers), "weights": None}, 1.0,
                         ColourScale(0.0, 1.0), 0)
    path = folder / arch / "model.onnx"
    path.parent.mkdir()
    begin = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(fitted, path)
    exported = time.perf_counter() - begin
    wall, cpu = time.perf_counter(), time.process_time()
    graph = onnx_graph.read_checked(path)
    return {"backbone": arch, "crop": side, "bank": [rows, dim], "file_mib": round(path.stat().st_size / 2**20, 1),
            "export_s": round(exported, 1), "check_wall_s": round(time.perf_counter() - wall, 2),
            "check_cpu_s": round(time.process_time() - cpu, 2), "peak_mib": round(graph.peak_bytes / 2**20, 1),
            "peak_of_limit": round(graph.peak_bytes / onnx_graph.MAX_PEAK_BYTES, 3),
            "work_g": round(graph.work / 1e9, 1), "work_of_limit": round(graph.work / onnx_graph.MAX_WORK, 3)}


def main() -> None:
    chosen = sys.argv[1:] or list(CASES)
    with tempfile.TemporaryDirectory() as folder:
        for arch in chosen:
            print(json.dumps(measure(arch, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
