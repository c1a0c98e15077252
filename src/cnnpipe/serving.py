"""The model others call: raw images in, class names and probabilities out.

`ImageClassifier` wraps a model folder and does its own decoding, resizing and normalisation,
so callers send images as they are. Train and transfer log it as an MLflow model whose loader
is this module (`loader_module`): what MLflow stores is data (weights, meta.json), never code or
a pickle, and `load` reads a logged model without running anything from it.
"""

from __future__ import annotations

import base64
import binascii
import io
import platform
import threading
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, DataType, Schema
from PIL import Image

from cnnpipe import engine, images, layout, networks, runtime, store
from cnnpipe.errors import UserError
from cnnpipe.images import UnreadableImage

with warnings.catch_warnings():
    # MLflow 3.17 warns, when mlflow.pyfunc is first imported, about a type hint in its own
    # GenAI types: nothing of ours, and it would reach every user of the logged model.
    warnings.filterwarnings("ignore", ".*Any type hint is inferred as AnyType", UserWarning)
    import mlflow.pyfunc

PYFUNC_REQUIREMENTS = [
    f"{name}=={version(name)}"
    for name in ("torch", "torchvision", "timm", "pillow", "pandas", "numpy", "mlflow", "pydantic")
]
REQUEST_PIXELS = 100_000_000  # the images of one request, together; each also `images.MAX_PIXELS`
_DECODING = threading.Lock()
CPU = torch.device("cpu")
# The logged model's environment, written out (from pip requirements alone MLflow would look
# for pip's own version, which a uv environment does not have, and warn).
CONDA_ENV = {
    "name": "cnnpipe",
    "channels": ["conda-forge"],
    "dependencies": [f"python={platform.python_version()}", "pip", {"pip": PYFUNC_REQUIREMENTS}],
}


def decode_image(data: bytes | str, image_size: int, resize: str = "squash") -> np.ndarray:
    """An encoded image file (bytes, or base64 text) -> uint8 RGB of `image_size` squared."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data)
        except (binascii.Error, ValueError) as err:
            raise UnreadableImage("bad_base64", f"not base64 text: {err}") from None
    return images.decode_bytes(data, image_size, resize)


def to_image(value, image_size: int, resize: str = "squash") -> np.ndarray:
    """One cell of the `image` column: encoded bytes, base64 text, or an H x W x 3 array
    (nested lists over JSON). One decode at a time per process (`_DECODING`): each holds up to
    `images.MAX_PIXELS` pixels, so concurrent requests cannot multiply that."""
    with _DECODING:
        if isinstance(value, bytes | str):
            return decode_image(value, image_size, resize)
        return images.from_pixels(value, image_size, resize)


def image_cells(model_input) -> list:
    """The images of a request, in every shape MLflow's scoring server hands them over: a
    DataFrame or a dict with an `image` column (`dataframe_split`, `dataframe_records`,
    `inputs: {"image": [...]}`), a list or 1-D array of encoded images (`inputs: [...]`,
    `instances: [...]`), or pixel arrays (one H x W x C, or a stack)."""
    if isinstance(model_input, pd.DataFrame | dict):
        if "image" not in model_input:
            columns = ", ".join(map(str, list(model_input)[:10])) or "none"
            raise UnreadableImage("bad_request", f"no `image` column (columns: {columns})")
        return list(model_input["image"])
    if isinstance(model_input, list) or np.asarray(model_input).dtype == object:
        return list(model_input)
    array = np.asarray(model_input)
    if array.dtype.kind in "US":  # base64 texts
        return [str(text) for text in array.reshape(-1)]
    return list(array[None] if array.ndim == 3 else array)


def _texts_unpacked(cells: list) -> list:
    """`cells`, with each cell that is a list of encoded images replaced by its images: how
    MLflow hands over `inputs: {"image": [...]}` and `instances: [...]` (one row holding them
    all)."""
    unpacked = []
    for cell in cells:
        items = cell.tolist() if isinstance(cell, np.ndarray) and cell.ndim == 1 else cell
        if (
            isinstance(items, list | tuple)
            and items
            and all(isinstance(i, str | bytes) for i in items)
        ):
            unpacked += list(items)
        else:
            unpacked.append(cell)
    return unpacked


def to_batch(model_input, image_size: int, resize: str = "squash") -> np.ndarray:
    """A request's images (`image_cells`) as a stack of decoded squares. Raises
    `UnreadableImage` for an empty request, one over `REQUEST_PIXELS`, or naming the first
    image that is not one."""
    cells = _texts_unpacked(image_cells(model_input))
    if not cells:
        raise UnreadableImage("bad_request", "the request holds no image")
    pixels = sum(map(_declared_pixels, cells))
    if pixels > REQUEST_PIXELS:
        reason = f"the request's images hold {pixels:,} pixels, more than {REQUEST_PIXELS:,}"
        raise UnreadableImage("too_large", f"{reason}: send fewer or smaller images per request")
    squares = []
    for number, cell in enumerate(cells):
        try:
            squares.append(to_image(cell, image_size, resize))
        except UnreadableImage as err:
            raise UnreadableImage(err.kind, f"image {number}: {err}") from None
    return np.stack(squares)


def _declared_pixels(cell) -> int:
    """The pixels an image cell will decode to, from its header (0 if it has none: decoding
    then says what is wrong with it)."""
    if isinstance(cell, bytes | str):
        try:
            data = base64.b64decode(cell) if isinstance(cell, str) else cell
            return images.declared_pixels(data)
        except (binascii.Error, ValueError):
            return 0
    try:
        return int(np.asarray(cell).size // 3)
    except (ValueError, TypeError):
        return 0


def encoded(images: np.ndarray) -> pd.DataFrame:
    """uint8 images as PNG files in an `image` column: the input the served model takes."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return pd.DataFrame({"image": files})


def probability_columns(classes: list[str]) -> list[str]:
    """The output's column of each class: `probability:<class>`. Class names are data, so
    they never are a column name alone; no class can collide with `class`, `probability`
    (neither has a colon) or with another class's column (names are distinct)."""
    return [f"probability:{name}" for name in classes]


def prediction_table(probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    best = probabilities.argmax(axis=1)
    columns = {
        "class": [classes[i] for i in best],
        "probability": probabilities[np.arange(len(best)), best],
    }
    columns |= dict(zip(probability_columns(classes), probabilities.T, strict=True))
    return pd.DataFrame(columns)


class ImageClassifier:
    """A model folder (`weights.pt` + `meta.json`) that takes raw images: a DataFrame column
    `image` whose cells are encoded files (bytes or base64 text) or uint8 H x W x 3 arrays, or
    such arrays directly. Output: one row per image with `class`, `probability` and one
    column `probability:<class>` per class."""

    def __init__(self, model_dir: Path):
        self.model, self.meta = networks.load_trained(model_dir)
        self.norm = engine.Normalisation(self.meta.mean, self.meta.std)
        # a request of any number of images costs no more memory than one batch
        self.batch_size = engine.inference_batch_size(
            self.model, self.norm, self.meta.image_size, CPU
        )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 images of the model's size -> N x classes probabilities."""
        return engine.predict_probabilities(self.model, images, self.norm, CPU, self.batch_size)

    def predict(self, model_input, params=None) -> pd.DataFrame:
        try:
            batch = to_batch(model_input, self.meta.image_size, self.meta.resize)
        except UnreadableImage as err:
            raise MlflowException(
                f"cannot read the request: {err}"
                if err.kind in ("bad_request", "too_large")
                else f"cannot read an image: {err}",
                error_code=INVALID_PARAMETER_VALUE,
            ) from None
        return prediction_table(self.probabilities(batch), self.meta.classes)


def at_size(pixels: np.ndarray, classifier: ImageClassifier) -> np.ndarray:
    """uint8 images (N x H x W x 3) at the classifier's own image size, resized the way its
    training images were prepared (`images.from_pixels`), so that a model is always scored on
    images prepared as it was trained."""
    size = classifier.meta.image_size
    if pixels.shape[1:3] == (size, size):
        return np.asarray(pixels)
    return np.stack([images.from_pixels(image, size) for image in pixels])


def _load_pyfunc(data_path: str) -> ImageClassifier:
    """MLflow's entry point for this model flavour (`loader_module: cnnpipe.serving`): the
    model is code of this package plus data, never a pickle. It runs where MLflow serves the
    model, so large decoded images are handed back to the kernel once answered."""
    runtime.return_freed_memory()
    return ImageClassifier(Path(data_path))


def output_schema(classes: list[str]) -> Schema:
    return Schema(
        [ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability")]
        + [ColSpec(DataType.double, column) for column in probability_columns(classes)]
    )


def logged_name(target: layout.TrainedModel, meta: store.ModelMeta) -> str:
    """The MLflow model's name: which of the two models, and its architecture."""
    return f"{target.name}-{meta.architecture}"


def log_model(target: layout.TrainedModel, example_images: np.ndarray | None) -> None:
    """Log `target`'s model folder to the active run as an MLflow model named after it
    (`scratch-small_cnn`): loaded by this module, with an input example of PNG files made
    from `example_images` (none when None: no picture of data leaves the machine)."""
    meta = store.read_model_meta(target.folder)
    example = None
    if example_images is not None:
        example = encoded(example_images)
        example["image"] = [base64.b64encode(data).decode() for data in example["image"]]
    mlflow.pyfunc.log_model(
        name=logged_name(target, meta),
        loader_module=__name__,
        data_path=str(target.folder),
        # `image` cells are encoded files or pixel arrays: only MLflow's AnyType takes both
        signature=ModelSignature(
            Schema([ColSpec(AnyType(), "image")]), output_schema(meta.classes)
        ),
        input_example=example,
        conda_env=CONDA_ENV,
    )


def load(model_uri: str) -> ImageClassifier:
    """The classifier of a logged or registered model, read as data: its MLmodel must name
    this module as the loader (no code or pickle from the model runs), its weights load with
    `weights_only` and its meta.json is validated. Anything else is a one-line `UserError`."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
    except (MlflowException, OSError) as err:
        reason = err.message if isinstance(err, MlflowException) else str(err)
        raise UserError(
            f"cannot fetch {model_uri} from the tracking store ({reason}): was its artifact "
            "folder deleted? Rerun evaluate to register a model again"
        ) from None
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        data = (local / flavor["data"]).resolve()
    except (OSError, yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(
            f"{model_uri}: its MLmodel file is not a cnnpipe model ({reason})"
        ) from None
    if (
        flavor.get("loader_module") != __name__
        or flavor.get("code")
        or not data.is_relative_to(local.resolve())
    ):
        raise UserError(
            f"{model_uri} is not loaded by {__name__} (MLmodel names "
            f"{flavor.get('loader_module')!r}): refusing to run its code"
        )
    return ImageClassifier(data)


def predict_files(classifier: ImageClassifier, paths: list[Path]) -> list[tuple[str, str]]:
    """One line of answer per file: its printable name and `class (probability)`, or why the
    file could not be read. Readable files are predicted together, in one batch."""
    size, resize = classifier.meta.image_size, classifier.meta.resize
    decoded, answers = {}, {}
    for path in paths:
        try:
            decoded[path] = images.decode_file(path, size, resize)
        except UnreadableImage as err:
            answers[path] = f"error: {err}"
    if decoded:
        table = classifier.predict(np.stack(list(decoded.values())))
        for path, row in zip(decoded, table.itertuples(index=False), strict=True):
            answers[path] = f"{row[0]} ({row[1]:.3f})"
    return [(images.safe_name(path), answers[path]) for path in paths]
