"""prepare: read the source images, resize, split train/val/test (stratified, seeded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from cnnpipe import plots, store, tracking
from cnnpipe.errors import UserError
from cnnpipe.params import Params
from cnnpipe.sources import LabelledImages, load_source

PREPARED = Path("data/prepared")
REPORT = Path("reports/prepare.json")


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Stratified, seeded index split into train, val and test."""
    everything = np.arange(len(labels))
    try:
        rest, test = train_test_split(
            everything, test_size=test_fraction, stratify=labels, random_state=seed
        )
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1 - test_fraction),
            stratify=labels[rest],
            random_state=seed,
        )
    except ValueError as err:
        smallest = min(Counter(labels.tolist()).values())
        raise UserError(
            f"cannot split {len(labels)} images (smallest class: {smallest}) into train/val/test"
            f" with every class in each split ({err}); add images or change data.val_fraction"
            " / data.test_fraction"
        ) from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _counts(loaded: LabelledImages, splits: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    return {
        split: {
            name: int(np.sum(loaded.labels[index] == i)) for i, name in enumerate(loaded.classes)
        }
        for split, index in splits.items()
    }


def run(params: Params) -> None:
    data = params.data
    logged = tracking.flatten({"seed": params.seed, "data": data.model_dump()})
    with tracking.stage_run(
        "prepare", params.tracking.experiment, logged, log_images=params.tracking.log_images
    ) as mlrun:
        loaded = load_source(data.source, data.image_size, data.on_bad_image)
        splits = split_indices(loaded.labels, data.val_fraction, data.test_fraction, params.seed)
        with store.atomic_dir(PREPARED) as staging:
            for split, index in splits.items():
                store.write_split(staging, split, loaded.images[index], loaded.labels[index])
            store.write_json(staging / "classes.json", loaded.classes)
        data_hash = store.fingerprint(PREPARED)
        counts = _counts(loaded, splits)
        bad_reasons = Counter(bad.kind for bad in loaded.bad_images)
        report = {
            "data_hash": data_hash,
            "image_size": data.image_size,
            "classes": loaded.classes,
            "images": counts,
            "bad_images": [vars(bad) for bad in loaded.bad_images],
        }
        store.write_json_atomic(REPORT, report)

        mlrun.set_fingerprint(data_hash)
        mlrun.log_metrics(
            {f"images.{split}": len(index) for split, index in splits.items()}
            | {f"images.{split}.{name}": n for split, c in counts.items() for name, n in c.items()}
            | {"bad_images": len(loaded.bad_images)}
            | {f"bad_images.{reason}": n for reason, n in bad_reasons.items()}
        )
        mlrun.log_dict(report, "prepare_report.json")
        train = splits["train"]
        figure = plots.samples_per_class(loaded.images[train], loaded.labels[train], loaded.classes)
        mlrun.log_data_figure(figure, "samples.png")
        plots.close(figure)
    for bad in loaded.bad_images:
        print(f"skipped {bad.path}: {bad.reason}")
    print(
        f"prepared {sum(map(len, splits.values()))} images of {len(loaded.classes)} classes "
        f"({len(loaded.bad_images)} skipped) into {PREPARED}"
    )
