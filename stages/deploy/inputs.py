"""The input recipe of a fitted model: one image file -> the (H, W, 3) uint8 array the model scores.

Both runtimes apply the recipe the model was fitted with (its saved `preprocess` record, or the
ONNX file's metadata), never today's params.yaml, so a model fitted at 224 px scores at 224 px.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from stages.data.raw import read_image, resize_and_crop


def prepare(path, preprocess: dict) -> np.ndarray:
    """One image file (or file object) -> (H, W, 3) uint8, resized and cropped as the training images were."""
    image = read_image(path, "RGB")
    # a writable copy: torch warns on (and must not share) the read-only buffer PIL hands out
    return np.array(resize_and_crop(image, preprocess["resize"], preprocess["crop_size"], Image.BILINEAR))


class PreparesInputs:
    """What both runtimes share: the input size and the preparation of an image file."""

    preprocess: dict  # resize, crop_size

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.preprocess["crop_size"], self.preprocess["crop_size"])

    def prepare(self, path) -> np.ndarray:
        return prepare(path, self.preprocess)
