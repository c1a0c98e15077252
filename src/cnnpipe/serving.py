"""The model others call: raw images in, class names and probabilities out.

`ImageClassifier` is the MLflow pyfunc logged by train and transfer; it wraps a model folder
and does its own decoding, resizing and normalisation, so callers send images as they are.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from cnnpipe import engine, images, models
from cnnpipe.images import UnreadableImage


def decode_image(data: bytes | str, image_size: int) -> np.ndarray:
    """An encoded image file (bytes, or base64 text) -> uint8 RGB of `image_size` squared."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data)
        except (binascii.Error, ValueError) as err:
            raise UnreadableImage("bad_base64", f"not base64 text: {err}") from None
    return images.decode_bytes(data, image_size)


def to_image(value, image_size: int) -> np.ndarray:
    """One cell of the `image` column: encoded bytes, base64 text, or an H x W x 3 array
    (nested lists over JSON)."""
    if isinstance(value, bytes | str):
        return decode_image(value, image_size)
    return images.from_pixels(value, image_size)


def to_batch(model_input, image_size: int) -> np.ndarray:
    """A DataFrame with an `image` column, or uint8 H x W x 3 arrays (one, or a stack), as a
    stack of decoded squares. Raises `UnreadableImage` naming the first image that is not one."""
    if isinstance(model_input, pd.DataFrame):
        cells, convert = list(model_input["image"]), to_image
    else:
        array = np.asarray(model_input)
        cells, convert = (array[None] if array.ndim == 3 else array), images.from_pixels
    squares = []
    for number, cell in enumerate(cells):
        try:
            squares.append(convert(cell, image_size))
        except UnreadableImage as err:
            raise UnreadableImage(err.kind, f"image {number}: {err}") from None
    return np.stack(squares)


def encoded(images: np.ndarray) -> pd.DataFrame:
    """uint8 images as PNG files in an `image` column: the input the served model takes."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return pd.DataFrame({"image": files})


def prediction_table(probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    best = probabilities.argmax(axis=1)
    table = pd.DataFrame(probabilities, columns=classes)
    table.insert(0, "probability", probabilities[np.arange(len(best)), best])
    table.insert(0, "class", [classes[i] for i in best])
    return table


# MLflow suggests type hints on `predict` for its own input validation; the signature logged
# with the model already describes the input, and the model accepts more than one form.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame column `image` whose cells are encoded files (bytes or base64 text)
    or uint8 H x W x 3 arrays; or such arrays directly. Output: one row per image with
    `class`, `probability` and one probability column per class."""

    @classmethod
    def from_folder(cls, model_dir: Path) -> ImageClassifier:
        classifier = cls()
        classifier.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
        return classifier

    def load_context(self, context) -> None:
        self.model, self.meta = models.load_trained(Path(context.artifacts["model_dir"]))
        self.norm = engine.Normalisation(tuple(self.meta["mean"]), tuple(self.meta["std"]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        batch = to_batch(model_input, self.meta["image_size"])
        probabilities = engine.predict_probabilities(
            self.model, batch, self.norm, torch.device("cpu")
        )
        return prediction_table(probabilities, self.meta["classes"])


def predict_files(classifier: ImageClassifier, paths: list[Path]) -> list[tuple[str, str]]:
    """One line of answer per file: its printable name and `class (probability)`, or why the
    file could not be read. Readable files are predicted together, in one batch."""
    size = classifier.meta["image_size"]
    decoded, answers = {}, {}
    for path in paths:
        try:
            decoded[path] = images.decode_file(path, size)
        except UnreadableImage as err:
            answers[path] = f"error: {err}"
    if decoded:
        table = classifier.predict(None, np.stack(list(decoded.values())))
        for path, row in zip(decoded, table.itertuples(index=False), strict=True):
            answers[path] = f"{row[0]} ({row[1]:.3f})"
    return [(images.safe_name(path), answers[path]) for path in paths]
