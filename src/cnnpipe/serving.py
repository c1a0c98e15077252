"""The model others call: raw images in, class names and probabilities out.

`ImageClassifier` is the MLflow pyfunc logged by train and transfer; it wraps a model folder
and does its own decoding, resizing and normalisation, so callers send images as they are.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from cnnpipe import engine, models


def decode_image(data: bytes | str, image_size: int) -> np.ndarray:
    """An encoded image file (bytes, or base64 text) -> uint8 RGB of `image_size` squared."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BICUBIC))


def resize_array(image: np.ndarray, image_size: int) -> np.ndarray:
    if image.shape[:2] == (image_size, image_size):
        return image
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return np.asarray(pil.resize((image_size, image_size), Image.Resampling.BICUBIC))


def to_batch(model_input, image_size: int) -> np.ndarray:
    """Accept a DataFrame with an `image` column (bytes or base64), or H x W x 3 uint8 arrays."""
    if isinstance(model_input, pd.DataFrame):
        images = [decode_image(value, image_size) for value in model_input["image"]]
    else:
        array = np.asarray(model_input)
        array = array[None] if array.ndim == 3 else array
        images = [resize_array(image, image_size) for image in array]
    return np.stack(images)


def prediction_table(probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    best = probabilities.argmax(axis=1)
    table = pd.DataFrame(probabilities, columns=classes)
    table.insert(0, "probability", probabilities[np.arange(len(best)), best])
    table.insert(0, "class", [classes[i] for i in best])
    return table


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, self.meta = models.load_trained(Path(context.artifacts["model_dir"]))
        self.norm = engine.Normalisation(tuple(self.meta["mean"]), tuple(self.meta["std"]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        batch = to_batch(model_input, self.meta["image_size"])
        probabilities = engine.predict_probabilities(
            self.model, batch, self.norm, torch.device("cpu")
        )
        return prediction_table(probabilities, self.meta["classes"])
