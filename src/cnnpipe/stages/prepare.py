"""prepare: read the source images, resize, split train/val/test (stratified, seeded).

The images are decoded once, in item order, into a spool file inside the staging folder, and
each image's pixels are hashed on the way: exact duplicates (the same decoded pixels) are
then kept in one split, and a class too small to appear in every split stops the stage. The
split streams from the spool, chunk by chunk, into each split's `images.npy`, so only a few
chunks are ever in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from cnnpipe import rules, store
from cnnpipe.errors import UserError
from cnnpipe.layout import PREPARE_REPORT, PREPARED
from cnnpipe.params import DataParams, Params
from cnnpipe.recorder import Recorder
from cnnpipe.sources import BadImage, ImageStream, native_shorter_sides, open_source

SPOOL = "decoded.u8"  # inside the staging folder; removed before it becomes PREPARED
EXAMPLES = 20  # cross-label duplicate groups named in the report
DUPLICATE_COUNTS = ("groups", "images", "cross_label_groups")  # logged to MLflow
MAX_ROUNDS = 64  # of `images_needed`: it settles in two or three


@dataclass
class Decoded:
    """The decoded images of a stream, in item order, spooled as raw uint8 rows."""

    spool: Path
    items: np.ndarray  # int64, ascending: the stream items the rows are
    keys: list[bytes]  # per row, a hash of its pixels
    bad_images: list[BadImage]


def decode_to_spool(stream: ImageStream, spool: Path) -> Decoded:
    """Decode every item of `stream` once into `spool`, hashing each image's pixels."""
    items, keys, bad_images = [], [], list(stream.skipped)
    with (
        spool.open("wb") as out,
        tqdm(total=len(stream.labels), desc="prepare", unit="img", mininterval=2) as bar,
    ):
        for chunk in stream.chunks:
            rows = np.ascontiguousarray(chunk.images)
            out.write(rows.data)
            items.append(chunk.items)
            keys += [hashlib.blake2b(row, digest_size=16).digest() for row in rows]
            bad_images += chunk.bad_images
            bar.update(chunk.covered)
    return Decoded(spool, np.concatenate([np.empty(0, np.int64), *items]), keys, bad_images)


def duplicate_groups(keys: list[bytes]) -> np.ndarray:
    """For each row, the first row with the same key: rows with equal groups are duplicates."""
    first: dict[bytes, int] = {}
    return np.array([first.setdefault(key, row) for row, key in enumerate(keys)], dtype=np.int64)


def smallest_class(
    total: int, val_fraction: float, test_fraction: float, own_test: bool
) -> int | None:
    """The fewest distinct images a class needs, among `total`, to be sure of at least one in
    each split that `split_indices` draws (with `own_test`: train and val only; `total` is then
    the source's train part); None when no class of at most `total` images can be. scikit-learn's
    stratified split gives each class the floor or the ceiling of its share of the first part
    and the remainder to the second."""
    n_test = 0 if own_test else math.ceil(test_fraction * total)
    rest = total - n_test
    val_share = val_fraction if own_test else val_fraction / (1 - test_fraction)
    n_val = math.ceil(val_share * rest)

    def sure(size: int) -> bool:
        kept = size * rest // total  # the fewest of its images left for train and val
        in_test = own_test or size * n_test >= total
        return in_test and kept * n_val >= rest and kept * (rest - n_val) >= rest

    return next((size for size in range(2, total + 1) if sure(size)), None)


def images_needed(sizes: np.ndarray, val_fraction, test_fraction, own_test: bool) -> int | None:
    """`smallest_class` for these class sizes, raised until it still holds once the smaller
    classes have grown to it (more images can raise the bound by one: rounding); None when
    these fractions cannot give every class an image in every split."""
    needed = smallest_class(int(sizes.sum()), val_fraction, test_fraction, own_test)
    for _ in range(MAX_ROUNDS):
        if needed is None:
            return None
        grown = int(np.maximum(sizes, needed).sum())
        again = smallest_class(grown, val_fraction, test_fraction, own_test)
        if again is not None and again <= needed:
            return needed
        needed = again
    return needed


def _require_class_sizes(
    labels: np.ndarray,
    classes: list[str],
    val_fraction: float,
    test_fraction: float,
    own_test: bool,
) -> None:
    sizes = np.bincount(labels, minlength=len(classes))
    enough = smallest_class(len(labels), val_fraction, test_fraction, own_test)
    if enough is not None and sizes.min() >= enough:
        return
    needed = images_needed(sizes, val_fraction, test_fraction, own_test)
    if needed is None:
        raise UserError(
            f"data.val_fraction {val_fraction} and data.test_fraction {test_fraction} leave"
            f" no training image for some class among {len(labels)} images: lower them, or"
            " add images"
        )
    small = [f"{classes[c]} ({sizes[c]})" for c in np.flatnonzero(sizes < needed)]
    splits = "train and val" if own_test else "train, val and test"
    raise UserError(
        f"too few distinct images in class {', '.join(small[:5])}"
        f"{f' and {len(small) - 5} more' if len(small) > 5 else ''}: with"
        f" data.val_fraction {val_fraction} and data.test_fraction {test_fraction} each class"
        f" needs at least {needed} (exact duplicates count once) to be sure of images in"
        f" {splits}; add images, or merge or remove the class"
    )


def split_indices(
    labels: np.ndarray,
    classes: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_items: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Stratified, seeded index split into train, val and test, with every class in each split
    (a class too small for that is an error that says how many images it needs). A source with
    a test split of its own (`test_items`) keeps it, and val is then `val_fraction` of the
    other items."""
    everything = np.arange(len(labels))
    if test_items is None:
        _require_class_sizes(labels, classes, val_fraction, test_fraction, own_test=False)
        rest, test = train_test_split(
            everything, test_size=test_fraction, stratify=labels, random_state=seed
        )
        val_share = val_fraction / (1 - test_fraction)
    else:
        rest, test, val_share = np.setdiff1d(everything, test_items), test_items, val_fraction
        _require_class_sizes(labels[rest], classes, val_fraction, test_fraction, own_test=True)
    train, val = train_test_split(
        rest, test_size=val_share, stratify=labels[rest], random_state=seed
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def split_numbers(splits: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """For each of `rows` rows, the number of its split in `store.SPLITS`."""
    numbers = np.empty(rows, dtype=np.int8)
    for number, split in enumerate(store.SPLITS):
        numbers[splits[split]] = number
    return numbers


def grouped_split(
    labels: np.ndarray,
    groups: np.ndarray,
    classes: list[str],
    fractions: tuple[float, float],
    seed: int,
    test_rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`split_indices` (val and test `fractions`) over the first row of each group of
    duplicates; the other rows follow their first, so identical images never straddle two
    splits. Without duplicates this is `split_indices` over all rows. `groups` must not join
    a source's own test rows (`test_rows`) with its other rows: that split is the source's,
    not ours to move."""
    firsts = np.flatnonzero(groups == np.arange(len(groups)))
    test_firsts = None if test_rows is None else np.flatnonzero(np.isin(firsts, test_rows))
    drawn = split_indices(labels[firsts], classes, *fractions, seed, test_firsts)
    split_of_first = np.empty(len(groups), dtype=np.int8)
    split_of_first[firsts] = split_numbers(drawn, len(firsts))
    split_of = split_of_first[groups]
    return {split: np.flatnonzero(split_of == n) for n, split in enumerate(store.SPLITS)}


def duplicates_summary(
    keys: list[bytes], labels: np.ndarray, splits: dict[str, np.ndarray], name_of
) -> dict:
    """How many groups of identical images there are, how many images they hold, how many mix
    labels (the first `EXAMPLES` named by `name_of(row)`) and how many straddle splits (only a
    source's own test split can cause that)."""
    by_pixels = duplicate_groups(keys)
    sizes = np.bincount(by_pixels, minlength=len(by_pixels))
    mixed_labels = _mixed(by_pixels, labels)
    mixed_splits = _mixed(by_pixels, split_numbers(splits, len(keys)))
    examples = [
        [name_of(row) for row in np.flatnonzero(by_pixels == first)]
        for first in np.flatnonzero(mixed_labels)[:EXAMPLES]
    ]
    return {
        "groups": int(np.sum(sizes > 1)),
        "images": int(np.sum(sizes[sizes > 1])),
        "cross_label_groups": int(mixed_labels.sum()),
        "groups_across_splits": int(mixed_splits.sum()),
        "cross_label_examples": examples,
    }


def _mixed(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per group (indexed by its first row), whether its rows hold more than one value."""
    low = np.full(len(groups), np.iinfo(np.int64).max)
    high = np.full(len(groups), np.iinfo(np.int64).min)
    np.minimum.at(low, groups, values)
    np.maximum.at(high, groups, values)
    return (low != high) & (groups == np.arange(len(groups)))


def spooled_chunks(decoded: Decoded, image_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The spooled rows, a chunk at a time, read (not memory-mapped: mapped pages would count
    in this process's memory until unmapped)."""
    rows, per_chunk = len(decoded.items), store.rows_per_chunk(image_shape)
    with decoded.spool.open("rb") as spool:
        for start in range(0, rows, per_chunk):
            size = min(per_chunk, rows - start)
            chunk = np.fromfile(spool, np.uint8, size * math.prod(image_shape))
            yield chunk.reshape(size, *image_shape)


def write_splits(
    decoded: Decoded,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    image_size: int,
    folder: Path,
) -> None:
    """Each spooled row, labelled, into its split's folder under `folder`, in item order."""
    split_of = split_numbers(splits, len(decoded.items))
    shape = (image_size, image_size, 3)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(store.SplitWriter(folder / s, shape)) for s in store.SPLITS]
        start = 0
        for chunk in spooled_chunks(decoded, shape):
            destination = split_of[start : start + len(chunk)]
            for number, writer in enumerate(writers):
                rows = destination == number
                writer.append(chunk[rows], labels[start : start + len(chunk)][rows])
            start += len(chunk)


def prepare_into(
    stream: ImageStream, folder: Path, image_size: int, fractions: tuple[float, float], seed: int
) -> tuple[list[BadImage], dict]:
    """Decode `stream`, split it (val and test `fractions`) with duplicates kept together, and
    write the split folder `folder`. Returns the files that could not be read and the
    duplicates' summary."""
    _require_room(stream, fractions)
    decoded = decode_to_spool(stream, folder / SPOOL)
    labels = stream.labels[decoded.items]
    test_rows = None
    keys = decoded.keys
    if stream.test_items is not None:
        test_rows = np.flatnonzero(np.isin(decoded.items, stream.test_items))
        keys = _within_parts(keys, test_rows)
    groups = duplicate_groups(keys)
    splits = grouped_split(labels, groups, stream.classes, fractions, seed, test_rows)
    write_splits(decoded, labels, splits, image_size, folder)
    decoded.spool.unlink()
    store.write_json(folder / "classes.json", stream.classes)
    duplicates = duplicates_summary(
        decoded.keys, labels, splits, lambda row: stream.name_of(int(decoded.items[row]))
    )
    return decoded.bad_images, duplicates


def _require_room(stream: ImageStream, fractions: tuple[float, float]) -> None:
    """The class-size check on the labels alone, before a pixel is decoded: decoding can only
    lose images (unreadable files, duplicates), so a class too small now stays too small."""
    if stream.test_items is None:
        _require_class_sizes(stream.labels, stream.classes, *fractions, own_test=False)
    else:
        rest = np.setdiff1d(np.arange(len(stream.labels)), stream.test_items)
        _require_class_sizes(stream.labels[rest], stream.classes, *fractions, own_test=True)


def _within_parts(keys: list[bytes], test_rows: np.ndarray) -> list[bytes]:
    """`keys` that no longer match across a source's own test split and its other rows."""
    in_test = np.zeros(len(keys), dtype=bool)
    in_test[test_rows] = True
    return [key + b"test" if test else key for key, test in zip(keys, in_test, strict=True)]


def _counts(labels: dict[str, np.ndarray], classes: list[str]) -> dict[str, dict[str, int]]:
    return {
        split: {name: int(np.sum(split_labels == i)) for i, name in enumerate(classes)}
        for split, split_labels in labels.items()
    }


def _imbalance(train_labels: np.ndarray, classes: int) -> str:
    """How the train classes compare, and what the imbalance rule then does (rules.py)."""
    counts = rules.class_counts(train_labels, classes)
    ratio = counts.max() / max(counts.min(), 1)
    if rules.imbalanced(train_labels, classes):
        return (
            f"imbalanced (largest / smallest class {ratio:.2f} > {rules.IMBALANCE_RATIO}): "
            "class-weighted loss, best epoch by val balanced accuracy, champion by macro-F1"
        )
    return f"balanced (largest / smallest class {ratio:.2f} <= {rules.IMBALANCE_RATIO})"


def _print_summary(
    images: int, classes: int, bad_images: list[BadImage], duplicates: dict, seconds: float
) -> None:
    for bad in bad_images:
        print(f"skipped {bad.path}: {bad.reason}")
    copies = (
        f", {duplicates['images']} identical images in {duplicates['groups']} groups"
        if duplicates["groups"]
        else ""
    )
    print(
        f"prepared {images} images of {classes} classes ({len(bad_images)} skipped{copies})"
        f" into {PREPARED} in {seconds:.1f} s ({images / seconds:.0f} img/s)"
    )
    if duplicates["cross_label_groups"]:
        print(
            f"warning: {duplicates['cross_label_groups']} groups of identical images carry"
            f" different labels (e.g. {' = '.join(duplicates['cross_label_examples'][0])}):"
            f" each group is kept in one split; see {PREPARE_REPORT}",
            file=sys.stderr,
        )


def working_size(data: DataParams) -> tuple[int, str]:
    """The image size, and why: `data.image_size`, or for `auto` `rules.working_size` of the
    source's native sizes."""
    if data.image_size != "auto":
        return data.image_size, "data.image_size"
    sides = native_shorter_sides(data.source)
    size = rules.working_size(sides)
    return size, (
        f"auto: median shorter side {int(np.median(sides)) if sides else 'unknown'} px, "
        f"rounded down to a multiple of {rules.SIZE_STEP} "
        f"within {rules.MIN_SIZE}..{rules.MAX_SIZE} px"
    )


def run(params: Params, recorder: Recorder) -> None:
    data = params.data
    started = time.perf_counter()
    image_size, size_reason = working_size(data)
    workers = data.workers or os.cpu_count() or 1
    stream = open_source(data.source, image_size, data.on_bad_image, workers, data.resize)
    fractions = (data.val_fraction, data.test_fraction)
    with store.atomic_dir(PREPARED) as staging:
        bad_images, duplicates = prepare_into(stream, staging, image_size, fractions, params.seed)
    seconds = time.perf_counter() - started
    written = {split: store.read_split(PREPARED, split) for split in store.SPLITS}
    labels = {split: written[split].labels for split in store.SPLITS}
    data_hash = store.fingerprint(PREPARED)
    counts = _counts(labels, stream.classes)
    report = {
        "data_hash": data_hash,
        "image_size": image_size,
        "image_size_reason": size_reason,
        "resize": data.resize,
        "classes": stream.classes,
        "imbalanced": _imbalance(labels["train"], len(stream.classes)),
        "images": counts,
        "bad_images": [vars(bad) for bad in bad_images],
        "duplicates": duplicates,
    }
    store.write_json_atomic(PREPARE_REPORT, report)
    _record(recorder, params, report, written, seconds)
    images = sum(map(len, labels.values()))
    _print_summary(images, len(stream.classes), bad_images, duplicates, seconds)


def _record(
    recorder: Recorder, params: Params, report: dict, written: dict, seconds: float
) -> None:
    """The prepare run: counts, the splits as datasets, the report, sample images."""
    labels = {split: written[split].labels for split in store.SPLITS}
    images = sum(map(len, labels.values()))
    classes, bad_images = report["classes"], report["bad_images"]
    recorder.log_splits(written, classes, report["data_hash"], params.data.source)
    recorder.log_metrics(
        {f"images.{split}": len(split_labels) for split, split_labels in labels.items()}
        | {"classes": len(classes), "images_per_second": images / seconds}
        | {"bad_images": len(bad_images)}
        | {f"bad_images.{kind}": n for kind, n in Counter(b["kind"] for b in bad_images).items()}
        | {f"duplicates.{key}": report["duplicates"][key] for key in DUPLICATE_COUNTS}
    )
    counts = report["images"]
    recorder.log_table(
        [{"class": c} | {split: counts[split][c] for split in counts} for c in classes],
        "images_per_class.json",
    )
    recorder.log_dict(report, "prepare_report.json")
    size = report["image_size"]
    recorder.describe(
        f"`{params.data.source}` as {size}x{size} RGB: {images} images of "
        f"{len(classes)} classes, split "
        + " / ".join(f"{len(labels[s])} {s}" for s in store.SPLITS)
        + f"; {len(bad_images)} files skipped, {report['duplicates']['groups']} groups of "
        f"identical images. Size: {report['image_size_reason']}. Classes: "
        f"{report['imbalanced']}. Details in `prepare_report.json`."
    )
    train = written["train"]
    recorder.log_samples(train.images, train.labels, classes)
