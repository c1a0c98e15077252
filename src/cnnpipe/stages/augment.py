"""augment: the train split plus `augment.copies` albumentations copies of each train image.

val and test are not touched: they stay in `data/prepared`.
"""

from __future__ import annotations

import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from tqdm import tqdm

from cnnpipe import plots, store, tracking
from cnnpipe.params import AugmentParams, Params
from cnnpipe.stages.prepare import PREPARED

AUGMENTED = Path("data/augmented")
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
        for i in tqdm(
            range(len(images)),
            desc=f"copy {c + 1}/{copies}",
            unit="img",
            mininterval=2,
            leave=False,
        ):
            out[c * len(images) + i] = policy(image=images[i])["image"]
    return out


def run(params: Params) -> None:
    augment = params.augment
    logged = tracking.flatten({"seed": params.seed, "augment": augment.model_dump()})
    experiment = params.tracking.experiment
    upstream = {"prepare": tracking.find_run(experiment, "prepare", store.fingerprint(PREPARED))}
    with tracking.stage_run(
        "augment", experiment, logged, upstream=upstream, log_images=params.tracking.log_images
    ) as mlrun:
        images, labels = store.read_split(PREPARED, "train")
        images = np.asarray(images)
        policy = build_policy(augment, params.seed)
        started = time.perf_counter()
        extra = augmented_copies(images, policy, augment.copies)
        seconds = time.perf_counter() - started
        with store.atomic_dir(AUGMENTED) as staging:
            store.write_split(
                staging,
                "train",
                np.concatenate([images, extra]),
                np.tile(labels, augment.copies + 1),
            )
        mlrun.set_fingerprint(store.fingerprint(AUGMENTED))
        mlrun.log_metrics(
            {
                "images.train": len(images) * (augment.copies + 1),
                "images_per_second": len(extra) / seconds if len(extra) else 0.0,
            }
        )
        mlrun.log_dict(A.to_dict(policy), "policy.json")
        if len(extra):
            shown = images[:PREVIEW_IMAGES]
            figure = plots.before_after(shown, extra[: len(shown)])
            mlrun.log_data_figure(figure, "preview.png")
            plots.close(figure)
    print(f"wrote {len(images)} train images and {len(extra)} augmented copies to {AUGMENTED}")
