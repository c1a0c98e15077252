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
import unicodedata
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
    kind: str  # an `UnreadableImage` kind, or broken_link | link_loop | relabelling_link |
    # outside_link | not_a_file | cannot_open
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
    skipped: list[BadImage] = field(default_factory=list)  # found while listing, not items
    name_of: Callable[[int], str] = "item {}".format  # an item's name for reports: its file


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8, N x S x S x 3
    labels: np.ndarray  # int64, N
    classes: list[str]
    bad_images: list[BadImage] = field(default_factory=list)


def open_source(
    source: str, image_size: int, on_bad_image: str = "skip", workers: int = 1, resize="squash"
) -> ImageStream:
    """The source's images as `image_size` squares; `resize` (images.RESIZE) says how a
    folder's non-square images become square (the built-in and torchvision sets are square)."""
    kind, _, argument = source.partition(":")
    if kind == "builtin":
        return _in_one_chunk(BUILTINS[argument](image_size))
    if kind == "torchvision":
        return stream_torchvision(argument, image_size)
    return stream_folder(Path(argument), image_size, on_bad_image, workers, resize)


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
        stream.skipped + [bad for chunk in chunks for bad in chunk.bad_images],
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


@dataclass
class FolderListing:
    files: list[Path]  # sorted per class
    labels: np.ndarray  # int64, one per file
    classes: list[str]  # the class folders' names, printable (see `images.safe_name`)
    skipped: list[BadImage]  # entries that are no file to decode: broken links, link loops


def decode_files(
    paths: list[Path], first_item: int, image_size: int, resize: str = "squash"
) -> Chunk:
    """The chunk of items `first_item, first_item + 1, ...` that `paths` are (runs in a worker)."""
    decoded = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    items, bad_images = [], []
    for offset, path in enumerate(paths):
        try:
            decoded[len(items)] = images.decode_file(path, image_size, resize)
            items.append(first_item + offset)
        except UnreadableImage as reason:
            bad_images.append(BadImage(images.safe_name(path), reason.kind, str(reason)))
    return Chunk(np.array(items, dtype=np.int64), decoded[: len(items)], len(paths), bad_images)


def list_folder(root: Path) -> FolderListing:
    """The files of `root/<class>/**`: hidden files and folders (".*") left out, links
    followed only where they cannot relabel an image (see `_files_under`)."""
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"data folder {root} {state}: point data.source at folder:<path>")
    skipped: list[BadImage] = []
    class_dirs = _class_folders(root, skipped)
    _require_distinct_names([folder.name for folder in class_dirs], root)
    homes = {folder: os.path.realpath(folder) for folder in class_dirs}
    tree = DataTree(os.path.realpath(root), tuple(homes.values()))
    files = {
        images.safe_name(folder.name): _files_under(folder, homes[folder], tree, skipped)
        for folder in class_dirs
    }
    if not any(files.values()):
        raise UserError(f"data folder {root} holds no images: put them in one sub-folder per class")
    classes = list(files)
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class folder; a classifier needs at least 2")
    _require_every_class([len(fs) for fs in files.values()], classes, root)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(fs) for fs in files.values()])
    return FolderListing([f for fs in files.values() for f in fs], labels, classes, skipped)


def _class_folders(root: Path, skipped: list[BadImage]) -> list[Path]:
    """The class folders of `root`, sorted. A link among them that loops, or that leads into
    the data folder itself or into another class's folder, is no class: it is skipped."""
    found, links = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            is_folder = path.is_dir()
        except OSError as err:  # a link loop (ELOOP), an unreadable mount
            skipped.append(_skip(path, "link_loop", f"cannot follow: {err.strerror}"))
            continue
        if is_folder:
            (links if path.is_symlink() else found).append(path)
    real_root = os.path.realpath(root)
    homes = [os.path.realpath(folder) for folder in found + links]
    for link in links:
        home = os.path.realpath(link)
        overlaps = [other for other in homes if other != home and _overlap(home, other)]
        if _within(home, real_root) or overlaps or homes.count(home) > 1:
            reason = "class folder link into the data folder or another class: not followed"
            skipped.append(_skip(link, "relabelling_link", reason))
        else:
            found.append(link)
    return sorted(found)


def _require_distinct_names(names: list[str], root: Path) -> None:
    """Class names must differ as printed, after Unicode normalisation (NFC: "é" written as one
    code point or as "e" + accent) and regardless of case: names equal in that sense look alike
    in every report, and are one folder on case-insensitive file systems."""
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())
        if key in seen:
            raise UserError(
                f"class folders {seen[key]} and {ascii(name)} in {images.safe_name(root)} have"
                " the same name once Unicode-normalised and case-folded: rename or merge one"
            )
        seen[key] = ascii(name)


@dataclass(frozen=True)
class DataTree:
    """Where a data folder's files really are (links resolved): its root and class folders."""

    root: str
    homes: tuple[str, ...]

    def problem(self, target: str, home: str, is_folder: bool) -> tuple[str, str] | None:
        """Why a link from inside the class folder `home` to `target` is not followed (a skip's
        kind and reason), or None.
        Into its own class folder: followed. Elsewhere into the data tree: not, since its
        images would be labelled with this class. Outside the tree: files followed (DVC's
        symlink cache lives there), folders not (a whole tree joining a class unseen)."""
        if _within(target, home):
            return None
        if _within(target, self.root) or any(_within(target, h) for h in self.homes):
            reason = "link into another part of the data folder: not followed (it would relabel it)"
            return "relabelling_link", reason
        if is_folder:
            reason = "link to a folder outside the data folder: not followed (copy it in instead)"
            return "outside_link", reason
        return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _overlap(one: str, other: str) -> bool:
    return _within(one, other) or _within(other, one)


def _files_under(folder: Path, home: str, tree: DataTree, skipped: list[BadImage]) -> list[Path]:
    """The files under `folder` (whose real path is `home`) at any depth, sorted. Links are
    followed where `tree.problem` allows; a link to a folder that contains it (a loop), a
    broken link (what `dvc gc` leaves of a DVC symlink cache), a link that loops on itself, an
    unlistable folder and anything that is not a regular file are appended to `skipped`."""
    files = []
    pending = [(folder, frozenset([_identity(folder)]))]
    while pending:
        current, enclosing = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as err:
            skipped.append(_skip(current, "cannot_open", f"cannot list folder: {err.strerror}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_folder, is_file = entry.is_dir(), entry.is_file()
            except OSError as err:  # a link loop (ELOOP)
                skipped.append(_skip(path, "link_loop", f"cannot follow link: {err.strerror}"))
                continue
            try:
                problem = (
                    entry.is_symlink()
                    and (is_folder or is_file)
                    and tree.problem(os.path.realpath(path), home, is_folder)
                )
                if problem:
                    skipped.append(_skip(path, *problem))
                elif is_folder:
                    if _identity(path) in enclosing:
                        reason = "link to a folder that contains it (a loop): not followed"
                        skipped.append(_skip(path, "link_loop", reason))
                    else:
                        pending.append((path, enclosing | {_identity(path)}))
                elif is_file:
                    files.append(path)
                elif entry.is_symlink() and not path.exists():
                    target = images.safe_name(os.readlink(path))
                    skipped.append(_skip(path, "broken_link", f"broken link to {target}"))
                else:
                    skipped.append(_skip(path, "not_a_file", "not a regular file"))
            except OSError as err:  # gone since it was listed (deleted meanwhile, or in /proc)
                skipped.append(_skip(path, "cannot_open", f"cannot read: {err.strerror or err}"))
    return sorted(files)


def _identity(folder: Path) -> tuple[int, int]:
    status = folder.stat()
    return status.st_dev, status.st_ino


def _skip(path: Path, kind: str, reason: str) -> BadImage:
    return BadImage(images.safe_name(path), kind, reason)


def _require_every_class(usable: Iterable[int], classes: list[str], root: Path) -> None:
    empty = [name for name, count in zip(classes, usable, strict=True) if count == 0]
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(empty)} in {root} have no usable image: "
            "add images or remove the folder"
        )


def stream_folder(
    root: Path, image_size: int, on_bad_image: str = "skip", workers: int = 1, resize="squash"
) -> ImageStream:
    """Read `root/<class>/**/<image>` with `workers` processes (1: in this process).
    Unreadable files are skipped and listed, or, with on_bad_image "fail", stop the stream."""
    listing = list_folder(root)
    if listing.skipped and on_bad_image == "fail":
        raise _bad_image_error(listing.skipped[0])
    chunks = _decoded_folder(listing, root, (image_size, resize), on_bad_image, workers)
    return ImageStream(
        listing.labels,
        listing.classes,
        chunks,
        skipped=listing.skipped,
        name_of=lambda item: images.safe_name(listing.files[item]),
    )


def _bad_image_error(bad: BadImage) -> UserError:
    return UserError(f"{bad.path}: {bad.reason} (remove the file, or set data.on_bad_image: skip)")


def _decoded_folder(listing: FolderListing, root, square, on_bad_image, workers):
    """`square`: (image size, resize rule)."""
    per_chunk = store.rows_per_chunk((square[0], square[0], 3))
    files = listing.files
    jobs = [(files[i : i + per_chunk], i, *square) for i in range(0, len(files), per_chunk)]
    with contextlib.closing(ordered_map(decode_files, jobs, workers)) as chunks:
        yield from _checked(chunks, listing.labels, listing.classes, root, on_bad_image)


def _checked(chunks, labels, classes, root, on_bad_image) -> Iterator[Chunk]:
    """`chunks`, stopped at the first bad file with on_bad_image "fail", then a check that
    every class kept at least one image."""
    usable = np.zeros(len(classes), dtype=np.int64)
    for chunk in chunks:
        if chunk.bad_images and on_bad_image == "fail":
            raise _bad_image_error(chunk.bad_images[0])
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


# Native sizes, for `data.image_size: auto` (rules.working_size).

BUILTIN_SIDES = {"digits": 8, "faces": 25}
SIZE_SAMPLE = 1000  # files of a folder whose headers are read to measure its images


def native_shorter_sides(source: str) -> list[int]:
    """The shorter side of the source's images as stored: every image of a built-in or
    torchvision set, or up to `SIZE_SAMPLE` files spread over an image folder (headers only;
    files that cannot be read are left out, prepare lists them)."""
    kind, _, argument = source.partition(":")
    if kind == "builtin":
        return [BUILTIN_SIDES[argument]]
    if kind == "torchvision":
        shape = np.asarray(_torchvision_part(argument, TORCHVISION_ROOT, train=True).data).shape
        return [min(shape[1], shape[2])]
    files = list_folder(Path(argument)).files
    sample = files[:: max(1, len(files) // SIZE_SAMPLE)]
    return [side for side in map(images.shorter_side, sample) if side]
