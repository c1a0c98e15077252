"""augment: the train split plus `augment.copies` albumentations copies of each train image.

val and test are not touched: they stay in `data/prepared`. The split streams through in
chunks (single process: the policy's draws must come in one fixed order to be repeatable).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cnnpipe import layout, plots, store, tracking
from cnnpipe.layout import AUGMENTED, PREPARED
from cnnpipe.params import AugmentParams, Params

# No check for a newer albumentations over the network each time the stage starts.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# albumentations imports its tensor helpers (`albumentations.pytorch`, and with them torch:
# 1.3 s) whenever torch is installed. augment works on NumPy arrays only; without the module
# albumentations skips them.
sys.modules.setdefault("albumentations.pytorch", None)
import albumentations as A  # noqa: E402

PREVIEW_IMAGES = 8


def build_policy(augment: AugmentParams, seed: int) -> A.Compose:
    """The augmentation policy. `seed` makes the sequence of draws repeatable (albumentations
    keeps its own generator; global seeds do not reach it)."""
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    return A.Compose(
        [
            A.Affine(
                translate_percent=(-augment.shift_limit, augment.shift_limit),
                scale=(1 - augment.scale_limit, 1 + augment.scale_limit),
                p=augment.shift_scale_p,
                **border,
            ),
            A.Rotate(limit=augment.rotate_limit, p=augment.rotate_p, **border),
            A.HorizontalFlip(p=augment.hflip_p),
            A.RandomBrightnessContrast(
                brightness_limit=augment.brightness_limit,
                contrast_limit=augment.contrast_limit,
                p=augment.brightness_contrast_p,
            ),
        ],
        seed=seed,
    )


def augmented_copies(images: np.ndarray, policy: A.Compose, copies: int) -> np.ndarray:
    """`copies` augmented versions of every image, copy-major: [all copy 1, all copy 2, ...]."""
    out = np.empty((copies * len(images), *images.shape[1:]), dtype=np.uint8)
    for c in range(copies):
        for i in range(len(images)):
            out[c * len(images) + i] = policy(image=images[i])["image"]
    return out


def write_augmented(
    images: np.ndarray, labels: np.ndarray, policy: A.Compose, copies: int, folder: Path
) -> None:
    """Write the train split `folder/train`: `images`, then `copies` augmented copies of them,
    chunk by chunk, so neither the input nor the output is ever whole in memory. The draws
    come in the same order as `augmented_copies(images, policy, copies)`, so the output is the
    same."""
    per_chunk = store.rows_per_chunk(images.shape[1:])
    chunks = [slice(start, start + per_chunk) for start in range(0, len(images), per_chunk)]
    with (
        store.SplitWriter(folder / "train", images.shape[1:]) as writer,
        tqdm(total=len(images) * copies, desc="augment", unit="img", mininterval=2) as bar,
    ):
        for rows in chunks:
            writer.append(np.asarray(images[rows]), labels[rows])
        for _ in range(copies):
            for rows in chunks:
                extra = augmented_copies(np.asarray(images[rows]), policy, 1)
                writer.append(extra, labels[rows])
                bar.update(len(extra))


def run(params: Params) -> None:
    augment = params.augment
    experiment = params.tracking.experiment
    upstream = tracking.find_runs(experiment, {"prepare": store.fingerprint(PREPARED)})
    with tracking.stage_run(
        "augment",
        experiment,
        layout.stage_params("augment", params),
        upstream=upstream,
        log_images=params.tracking.log_images,
    ) as mlrun:
        train = store.read_split(PREPARED, "train")
        images, labels = train.images, train.labels
        policy = build_policy(augment, params.seed)
        started = time.perf_counter()
        with store.atomic_dir(AUGMENTED) as staging:
            write_augmented(images, labels, policy, augment.copies, staging)
        seconds = time.perf_counter() - started
        extra = len(images) * augment.copies
        mlrun.set_fingerprint(store.fingerprint(AUGMENTED))
        mlrun.log_metrics(
            {
                "images.train": len(images) + extra,
                "images_per_second": extra / seconds if extra else 0.0,
            }
        )
        mlrun.log_dict(A.to_dict(policy), "policy.json")
        mlrun.describe(
            f"The train split ({len(images)} images) and {augment.copies} albumentations "
            f"cop{'y' if augment.copies == 1 else 'ies'} of each; the policy is `policy.json`."
        )
        if extra:
            shown = np.asarray(images[:PREVIEW_IMAGES])
            augmented = store.read_split(AUGMENTED, "train").images
            copies = np.asarray(augmented[len(images) : len(images) + len(shown)])
            figure = plots.before_after(shown, copies)
            mlrun.log_data_figure(figure, "preview.png")
            plots.close(figure)
    print(f"wrote {len(images)} train images and {extra} augmented copies to {AUGMENTED}")
