"""Where images come from: the built-in data sets and a folder with one sub-folder per class.

Every source yields the same thing: uint8 RGB images of one square size, int64 labels, the
class names, and the files that could not be read (with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from cnnpipe.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class BadImage:
    path: str
    kind: str  # empty_file | not_an_image | unreadable | decode_error
    reason: str


class UnreadableImage(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8, N x S x S x 3
    labels: np.ndarray  # int64, N
    classes: list[str]
    bad_images: list[BadImage] = field(default_factory=list)


def load_source(source: str, image_size: int, on_bad_image: str = "skip") -> LabelledImages:
    kind, _, argument = source.partition(":")
    if kind == "builtin":
        return BUILTINS[argument](image_size)
    return load_folder(Path(argument), image_size, on_bad_image)


def _resize_all(gray: np.ndarray, image_size: int) -> np.ndarray:
    """Grey float images in [0, 1] -> uint8 RGB images of `image_size` squared."""
    out = np.empty((len(gray), image_size, image_size, 3), dtype=np.uint8)
    for i, image in enumerate(gray):
        pil = Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L")
        resized = pil.resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(resized)[..., None]
    return out


def load_digits(image_size: int) -> LabelledImages:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = _resize_all(digits.images / 16.0, image_size)
    classes = [str(name) for name in digits.target_names]
    return LabelledImages(images, digits.target.astype(np.int64), classes)


def load_faces(image_size: int) -> LabelledImages:
    """scikit-image's 200 LFW crops (25x25): 100 faces then 100 non-faces."""
    from skimage.data import lfw_subset

    faces = lfw_subset()
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return LabelledImages(_resize_all(faces, image_size), labels, ["face", "non_face"])


BUILTINS = {"digits": load_digits, "faces": load_faces}


def read_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one file into uint8 RGB of `image_size` squared, EXIF orientation applied."""
    if path.stat().st_size == 0:
        raise UnreadableImage("empty_file", "empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        reason = "not a readable image (unknown or corrupt format)"
        raise UnreadableImage("unreadable", reason) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage("decode_error", f"cannot decode image: {err}") from None


def _class_files(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: point data.source at folder:<path>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {
        d.name: sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
        for d in class_dirs
    }
    if not any(files.values()):
        raise UserError(f"data folder {root} holds no images: put them in one sub-folder per class")
    return files


def load_folder(root: Path, image_size: int, on_bad_image: str = "skip") -> LabelledImages:
    """Read `root/<class>/**/<image>`; unreadable files are skipped and listed, or fail."""
    images, labels, bad_images = [], [], []
    class_files = _class_files(root)
    all_files = [(name, f) for name, fs in class_files.items() for f in fs]
    for name, path in tqdm(all_files, desc="decode", unit="img", mininterval=2):
        try:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UnreadableImage(
                    "not_an_image", f"not an image file type ({path.suffix or 'no extension'})"
                )
            images.append(read_image(path, image_size))
            labels.append(name)
        except UnreadableImage as reason:
            if on_bad_image == "fail":
                raise UserError(
                    f"{path}: {reason} (remove the file, or set data.on_bad_image: skip)"
                ) from None
            bad_images.append(BadImage(str(path), reason.kind, str(reason)))
    classes = list(class_files)
    empty = [name for name in classes if name not in set(labels)]
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(empty)} in {root} have no usable image: "
            "add images or remove the folder"
        )
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class folder; a classifier needs at least 2")
    index = {name: i for i, name in enumerate(classes)}
    return LabelledImages(
        np.stack(images), np.array([index[n] for n in labels], dtype=np.int64), classes, bad_images
    )
