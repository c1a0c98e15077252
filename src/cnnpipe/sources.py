"""Where images come from: the built-in data sets, a folder with one sub-folder per class, and
torchvision data sets.

Every source opens as an `ImageStream`: the labels of all its items up front, so the split can
be decided before a pixel is decoded, then the pixels chunk by chunk, in item order, as uint8
RGB images of one square size. A folder is decoded in worker processes by `images`, the one
decoder; files that cannot be read are reported with the reason, not lost.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cnnpipe import images, store
from cnnpipe.errors import UserError
from cnnpipe.images import UnreadableImage

TORCHVISION_ROOT = Path("data/torchvision")


@dataclass
class BadImage:
    path: str  # printable (`images.safe_name`)
    kind: str  # an `UnreadableImage` kind
    reason: str


@dataclass
class Chunk:
    """Consecutive items of a stream: the ones decoded and the files that could not be."""

    items: np.ndarray  # int64, the stream positions of `images`, ascending
    images: np.ndarray  # uint8, len(items) x S x S x 3
    covered: int  # items the chunk accounts for: decoded plus bad
    bad_images: list[BadImage] = field(default_factory=list)


@dataclass
class ImageStream:
    labels: np.ndarray  # int64, one per item, known before decoding
    classes: list[str]
    chunks: Iterator[Chunk]  # every item once, in order
    test_items: np.ndarray | None = None  # the items of the source's own test split, if any


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8, N x S x S x 3
    labels: np.ndarray  # int64, N
    classes: list[str]
    bad_images: list[BadImage] = field(default_factory=list)


def open_source(
    source: str, image_size: int, on_bad_image: str = "skip", workers: int = 1
) -> ImageStream:
    kind, _, argument = source.partition(":")
    if kind == "builtin":
        return _in_one_chunk(BUILTINS[argument](image_size))
    if kind == "torchvision":
        return stream_torchvision(argument, image_size)
    return stream_folder(Path(argument), image_size, on_bad_image, workers)


def load_source(source: str, image_size: int, on_bad_image: str = "skip") -> LabelledImages:
    """A whole source in memory: for the small built-ins and tests, not for large folders."""
    return collect(open_source(source, image_size, on_bad_image))


def load_folder(root: Path, image_size: int, on_bad_image: str = "skip") -> LabelledImages:
    return collect(stream_folder(root, image_size, on_bad_image))


def collect(stream: ImageStream) -> LabelledImages:
    chunks = list(stream.chunks)
    items = np.concatenate([chunk.items for chunk in chunks])
    return LabelledImages(
        np.concatenate([chunk.images for chunk in chunks]),
        stream.labels[items],
        stream.classes,
        [bad for chunk in chunks for bad in chunk.bad_images],
    )


# The built-ins: a few hundred tiny images, loaded in memory.


def _in_one_chunk(loaded: LabelledImages) -> ImageStream:
    everything = np.arange(len(loaded.labels))
    chunk = Chunk(everything, loaded.images, len(everything))
    return ImageStream(loaded.labels, loaded.classes, iter([chunk]))


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
    squares = _resize_all(digits.images / 16.0, image_size)
    classes = [str(name) for name in digits.target_names]
    return LabelledImages(squares, digits.target.astype(np.int64), classes)


def load_faces(image_size: int) -> LabelledImages:
    """scikit-image's 200 LFW crops (25x25): 100 faces then 100 non-faces."""
    from skimage.data import lfw_subset

    faces = lfw_subset()
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return LabelledImages(_resize_all(faces, image_size), labels, ["face", "non_face"])


BUILTINS = {"digits": load_digits, "faces": load_faces}


# Image folders: listed up front, decoded chunk by chunk in worker processes.


def decode_files(paths: list[Path], first_item: int, image_size: int) -> Chunk:
    """The chunk of items `first_item, first_item + 1, ...` that `paths` are (runs in a worker)."""
    decoded = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    items, bad_images = [], []
    for offset, path in enumerate(paths):
        try:
            decoded[len(items)] = images.decode_file(path, image_size)
            items.append(first_item + offset)
        except UnreadableImage as reason:
            bad_images.append(BadImage(images.safe_name(path), reason.kind, str(reason)))
    return Chunk(np.array(items, dtype=np.int64), decoded[: len(items)], len(paths), bad_images)


def list_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files (sorted per class), their labels and the class names of `root/<class>/**`."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist: point data.source at folder:<path>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {
        d.name: sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
        for d in class_dirs
    }
    if not any(files.values()):
        raise UserError(f"data folder {root} holds no images: put them in one sub-folder per class")
    classes = list(files)
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class folder; a classifier needs at least 2")
    _require_every_class([len(fs) for fs in files.values()], classes, root)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(fs) for fs in files.values()])
    return [f for fs in files.values() for f in fs], labels, classes


def _require_every_class(usable: Iterable[int], classes: list[str], root: Path) -> None:
    empty = [name for name, count in zip(classes, usable, strict=True) if count == 0]
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(empty)} in {root} have no usable image: "
            "add images or remove the folder"
        )


def stream_folder(
    root: Path, image_size: int, on_bad_image: str = "skip", workers: int = 1
) -> ImageStream:
    """Read `root/<class>/**/<image>` with `workers` processes (1: in this process).
    Unreadable files are skipped and listed, or, with on_bad_image "fail", stop the stream."""
    files, labels, classes = list_folder(root)
    chunks = _decoded_folder(files, labels, classes, root, image_size, on_bad_image, workers)
    return ImageStream(labels, classes, chunks)


def _decoded_folder(files, labels, classes, root, image_size, on_bad_image, workers):
    per_chunk = store.rows_per_chunk((image_size, image_size, 3))
    jobs = [(files[i : i + per_chunk], i, image_size) for i in range(0, len(files), per_chunk)]
    with contextlib.closing(ordered_map(decode_files, jobs, workers)) as chunks:
        yield from _checked(chunks, labels, classes, root, on_bad_image)


def _checked(chunks, labels, classes, root, on_bad_image) -> Iterator[Chunk]:
    """`chunks`, stopped at the first bad file with on_bad_image "fail", then a check that
    every class kept at least one image."""
    usable = np.zeros(len(classes), dtype=np.int64)
    for chunk in chunks:
        if chunk.bad_images and on_bad_image == "fail":
            bad = chunk.bad_images[0]
            raise UserError(
                f"{bad.path}: {bad.reason} (remove the file, or set data.on_bad_image: skip)"
            )
        usable += np.bincount(labels[chunk.items], minlength=len(classes))
        yield chunk
    _require_every_class(usable.tolist(), classes, root)


def ordered_map(function: Callable, jobs: list[tuple], workers: int) -> Iterator:
    """`function(*job)` for each job, in order. With more than one worker the jobs run in a
    pool of fresh ("spawn") processes, at most two per worker in flight, so results never pile
    up in memory when the reader is slower than the workers. Workers exit soon after this
    process dies, even by kill -9 (see `_exit_with_parent`)."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        yield from itertools.starmap(function, jobs)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        pending = deque()
        for job in jobs:
            if len(pending) == 2 * workers:
                yield pending.popleft().result()
            pending.append(pool.submit(function, *job))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """Start a thread in this worker that ends it once `parent` is no longer its parent. A
    pool's workers otherwise outlive a killed parent: they wait for jobs on a queue whose other
    end they hold themselves, and keep multiprocessing's resource tracker alive with them."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# torchvision data sets: downloaded once into data/torchvision, held in memory as uint8.


def stream_torchvision(name: str, image_size: int, root: Path = TORCHVISION_ROOT) -> ImageStream:
    """torchvision's `name` (CIFAR10, MNIST, ...): its train part, then its test part, which
    is kept as the test split."""
    train, test = (_torchvision_part(name, root, train=flag) for flag in (True, False))
    labels = np.concatenate([np.asarray(part.targets, dtype=np.int64) for part in (train, test)])
    chunks = itertools.chain(
        _resized_chunks(np.asarray(train.data), 0, image_size),
        _resized_chunks(np.asarray(test.data), len(train.data), image_size),
    )
    test_items = np.arange(len(train.data), len(labels))
    return ImageStream(labels, list(train.classes), chunks, test_items)


def _torchvision_part(name: str, root: Path, train: bool):
    import torchvision

    try:
        return getattr(torchvision.datasets, name)(root, train=train, download=True)
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(
            f"could not download torchvision data set {name} ({reason}): connect to the "
            f"internet once, or put its files in {root}"
        ) from None


def _resized_chunks(pixels: np.ndarray, first_item: int, image_size: int) -> Iterator[Chunk]:
    """uint8 images (N x H x W grey or N x H x W x 3) as RGB `image_size`-squared chunks."""
    per_chunk = store.rows_per_chunk((image_size, image_size, 3))
    for start in range(0, len(pixels), per_chunk):
        part = pixels[start : start + per_chunk]
        squares = np.stack([images.from_pixels(image, image_size) for image in part])
        items = np.arange(first_item + start, first_item + start + len(part))
        yield Chunk(items, squares, len(part))
