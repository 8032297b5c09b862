"""A generated category of elongated frames with defects near the ends, in MVTec AD layout.

Independent of stages/data/synthetic.py on purpose: the test of what each preprocess.mode shows
(tests/test_modes.py) and bench/modes_elongated.py must not move when the carpet generator does.

Every frame is `width` x `height` (default 480 x 160, 3 : 1) of a woven texture: two sinusoids with
per-image random phases plus pixel noise, stationary, so every position of a good frame looks like
every other. A defective frame carries one dark disc entirely inside the outer `END_SHARE` of the
frame's length, left or right end at random: with any centre crop of a 3 : 1 frame (the centre third
at most) no defect pixel is in view. Its mask is exactly the disc. Each image has its own generator,
seeded from SeedSequence([seed, split, index]), so equal arguments give identical files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

END_SHARE = 0.22  # a defect lies within this share of the length from either end
RADIUS = (14, 20)  # disc radius in pixels, drawn uniformly
PERIOD = 24  # the texture's period in pixels


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * x / PERIOD + phase[0]) + np.sin(2 * np.pi * y / PERIOD + phase[1])
    base = np.array([150.0, 140.0, 118.0]) * rng.uniform(0.95, 1.05)
    image = base + 22.0 * weave[..., None] + rng.normal(0, 6, (height, width, 3))
    return image


def _defect(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Draw one dark disc near an end of `image` (in place); its mask."""
    height, width = image.shape[:2]
    radius = int(rng.integers(RADIUS[0], RADIUS[1] + 1))
    reach = int(END_SHARE * width) - radius  # the disc's centre: its whole disc within the end share
    offset = int(rng.integers(radius + 2, reach + 1))
    cx = offset if rng.random() < 0.5 else width - 1 - offset
    cy = int(rng.integers(radius + 2, height - radius - 2))
    y, x = np.mgrid[0:height, 0:width]
    mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    image[mask] = np.array([58.0, 42.0, 34.0]) + rng.normal(0, 6, (int(mask.sum()), 3))
    return mask


def write_elongated(root: Path, n_train: int = 30, n_test_good: int = 10, n_test_defect: int = 10,
                    width: int = 480, height: int = 160, seed: int = 0) -> Path:
    """root/train/good, root/test/{good,spot}, root/ground_truth/spot (PNG); returns root."""
    root = Path(root)
    plan = [("train/good", n_train, False), ("test/good", n_test_good, False), ("test/spot", n_test_defect, True)]
    masks = root / "ground_truth" / "spot"
    for split, (folder, count, defective) in enumerate(plan):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng(np.random.SeedSequence([seed, split, i]))
            image = _texture(rng, width, height)
            if defective:
                mask = _defect(rng, image)
                masks.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(masks / f"{i:03d}_mask.png")
            pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / folder / f"{i:03d}.png")
    return root


PATCHCORE = "patchcore_effnet"  # params.yaml's own PatchCore on EfficientNet-Lite0, its paper-default settings


def mode_project(folder: Path, source: Path, mode: str, models: list[str] | dict, resize: int = 128,
                 crop_size: int = 112, export: bool = False) -> Path:
    """A project in `folder` that reads the category `source` (a folder named as the category) with
    `preprocess.mode: mode` and runs download, preprocess, extract, fit and evaluate (and export) in this
    process for `models` (names from params.yaml, or a {name: entry} mapping); returns the project folder.
    resize / crop_size: the paper's 256 / 224 ratio at half the side, which keeps the run short."""
    from tests.conftest import call_stage, default_params, write_params

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = default_params()
    category = Path(source).name
    params["data"].update(source="folder", folder=str(Path(source).parent), categories=[category])
    params["preprocess"].update(resize=resize, crop_size=crop_size, mode=mode, val_fraction=0.2)
    params["device"] = "cpu"
    params["fit_seeds"] = [0]
    params["evaluate"]["bootstrap"]["resamples"] = 20
    shipped = params["models"]
    params["models"] = dict(models) if isinstance(models, dict) else {name: shipped[name] for name in models}
    write_params(folder, params)
    call_stage("download", category, cwd=folder)
    call_stage("preprocess", category, cwd=folder)
    call_stage("extract", category, "efficientnet_lite0", cwd=folder)
    for name in params["models"]:
        stages = ("fit", "evaluate", "export") if export else ("fit", "evaluate")
        for stage in stages:
            call_stage(stage, category, name, cwd=folder)
    return folder
