"""prepare: read the source images, resize, split train/val/test (stratified, seeded).

The split is decided over the source's items before any is decoded; the images then stream,
chunk by chunk, into their split's `images.npy`, so only a few chunks are in memory at a time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from cnnpipe import plots, store, tracking
from cnnpipe.errors import UserError
from cnnpipe.params import Params
from cnnpipe.sources import BadImage, ImageStream, open_source

PREPARED = Path("data/prepared")
REPORT = Path("reports/prepare.json")


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_items: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Stratified, seeded index split into train, val and test. A source with a test split of
    its own (`test_items`) keeps it, and val is then `val_fraction` of the other items."""
    everything = np.arange(len(labels))
    try:
        if test_items is None:
            rest, test = train_test_split(
                everything, test_size=test_fraction, stratify=labels, random_state=seed
            )
            val_share = val_fraction / (1 - test_fraction)
        else:
            rest, test, val_share = np.setdiff1d(everything, test_items), test_items, val_fraction
        train, val = train_test_split(
            rest, test_size=val_share, stratify=labels[rest], random_state=seed
        )
    except ValueError as err:
        smallest = min(Counter(labels.tolist()).values())
        raise UserError(
            f"cannot split {len(labels)} images (smallest class: {smallest}) into train/val/test"
            f" with every class in each split ({err}); add images or change data.val_fraction"
            " / data.test_fraction"
        ) from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_splits(
    stream: ImageStream, splits: dict[str, np.ndarray], folder: Path, image_size: int
) -> list[BadImage]:
    """Write every decoded image of `stream` into its split under `folder`, in item order, as
    the chunks arrive; return the files that could not be read."""
    split_of = np.empty(len(stream.labels), dtype=np.int8)
    for number, split in enumerate(store.SPLITS):
        split_of[splits[split]] = number
    bad_images = []
    with contextlib.ExitStack() as stack:
        shape = (image_size, image_size, 3)
        writers = [stack.enter_context(store.SplitWriter(folder / s, shape)) for s in store.SPLITS]
        bar = stack.enter_context(
            tqdm(total=len(split_of), desc="prepare", unit="img", mininterval=2)
        )
        for chunk in stream.chunks:
            destination = split_of[chunk.items]
            for number, writer in enumerate(writers):
                rows = destination == number
                writer.append(chunk.images[rows], stream.labels[chunk.items[rows]])
            bad_images += chunk.bad_images
            bar.update(chunk.covered)
    return bad_images


def _counts(labels: dict[str, np.ndarray], classes: list[str]) -> dict[str, dict[str, int]]:
    return {
        split: {name: int(np.sum(split_labels == i)) for i, name in enumerate(classes)}
        for split, split_labels in labels.items()
    }


def run(params: Params) -> None:
    data = params.data
    logged = tracking.flatten({"seed": params.seed, "data": data.model_dump()})
    with tracking.stage_run(
        "prepare", params.tracking.experiment, logged, log_images=params.tracking.log_images
    ) as mlrun:
        started = time.perf_counter()
        workers = data.workers or os.cpu_count() or 1
        stream = open_source(data.source, data.image_size, data.on_bad_image, workers)
        splits = split_indices(
            stream.labels, data.val_fraction, data.test_fraction, params.seed, stream.test_items
        )
        with store.atomic_dir(PREPARED) as staging:
            bad_images = stream.skipped + write_splits(stream, splits, staging, data.image_size)
            store.write_json(staging / "classes.json", stream.classes)
        seconds = time.perf_counter() - started
        labels = {split: store.read_split(PREPARED, split)[1] for split in store.SPLITS}
        images = sum(map(len, labels.values()))
        data_hash = store.fingerprint(PREPARED)
        counts = _counts(labels, stream.classes)
        bad_reasons = Counter(bad.kind for bad in bad_images)
        report = {
            "data_hash": data_hash,
            "image_size": data.image_size,
            "classes": stream.classes,
            "images": counts,
            "bad_images": [vars(bad) for bad in bad_images],
        }
        store.write_json_atomic(REPORT, report)

        mlrun.set_fingerprint(data_hash)
        mlrun.log_metrics(
            {f"images.{split}": len(split_labels) for split, split_labels in labels.items()}
            | {f"images.{split}.{name}": n for split, c in counts.items() for name, n in c.items()}
            | {"bad_images": len(bad_images), "images_per_second": images / seconds}
            | {f"bad_images.{reason}": n for reason, n in bad_reasons.items()}
        )
        mlrun.log_dict(report, "prepare_report.json")
        train_images, train_labels = store.read_split(PREPARED, "train")
        figure = plots.samples_per_class(train_images, train_labels, stream.classes)
        mlrun.log_data_figure(figure, "samples.png")
        plots.close(figure)
    for bad in bad_images:
        print(f"skipped {bad.path}: {bad.reason}")
    print(
        f"prepared {images} images of {len(stream.classes)} classes ({len(bad_images)} skipped)"
        f" into {PREPARED} in {seconds:.1f} s ({images / seconds:.0f} img/s)"
    )
