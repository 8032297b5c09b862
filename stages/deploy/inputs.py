"""The input recipe of a fitted model: one image file -> the (H, W, 3) uint8 array the model scores.

Both runtimes apply the recipe the model was fitted with (its saved `preprocess` record, or the
ONNX file's metadata), never today's params.yaml, so a model fitted at 224 px scores at 224 px and a
model fitted with `mode: pad` sees padded frames. The recipe's function is the preprocess stage's own
(stages/data/raw.py prepare_image); a record without a mode (a fit older than modes) means crop.
"""
from __future__ import annotations

import numpy as np

from stages.data.raw import prepare_image, read_image, recipe


def prepare(path, preprocess: dict) -> np.ndarray:
    """One image file (or file object) -> (H, W, 3) uint8, brought to the model's input as the training images were."""
    image = read_image(path, "RGB")
    # a writable copy: torch warns on (and must not share) the read-only buffer PIL hands out
    return np.array(prepare_image(image, preprocess))


def input_recipe(record: dict) -> dict:
    """A saved or exported `preprocess` record -> the recipe (resize, crop_size, mode, pad_fill), checked;
    raises KeyError, ValueError or TypeError on a record that is not one."""
    return recipe(record)


# The recipe in words, per mode, for whoever feeds an exported model outside this project
# (torchvision.transforms.v2 on the PIL image gives the same pixels: tests/test_modes.py).
STEPS = {
    "crop": "Resize(resize) + CenterCrop(crop_size): the shorter side resized to `resize` (the longer one to "
            "int(resize * long / short)), then the crop_size square at round((side - crop_size) / 2)",
    "resize": "Resize((crop_size, crop_size)): the whole image, aspect not kept",
    "pad": "Resize(size=None, max_size=crop_size) + CenterCrop(crop_size) padding with pad_fill: the longer side "
           "resized to crop_size (the shorter one to int(crop_size * short / long)), centred on a crop_size square "
           "of RGB pad_fill (a margin's odd pixel right / bottom); padded pixels are no part of any pixel metric",
}


def exported_recipe(preprocess: dict) -> dict:
    """The recipe as the ONNX metadata carries it: the values, the resampling and the steps in words."""
    values = recipe(preprocess)
    return {**values, "resample": "bilinear", "steps": STEPS[values["mode"]]}


class PreparesInputs:
    """What both runtimes share: the input size and the preparation of an image file."""

    preprocess: dict  # resize, crop_size, mode, pad_fill (stages/data/raw.py recipe)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.preprocess["crop_size"], self.preprocess["crop_size"])

    def prepare(self, path) -> np.ndarray:
        return prepare(path, self.preprocess)
