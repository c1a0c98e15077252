"""augment: the augmentation policy (albumentations), and the train split the training stages
read, with `augment.copies` offline augmented copies of each image.

The policy (`augment.policy`: photo, document or texture; `auto` by `rules.policy_for`) is
written to `data/augmented/augmentation.json` (albumentations' `A.to_dict`); with
`augment.on_the_fly`, the training stages draw every train image through it again each epoch.
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

from cnnpipe import rules, store
from cnnpipe.layout import AUGMENTATION, AUGMENTED, PREPARED
from cnnpipe.params import AugmentParams, Params
from cnnpipe.recorder import Recorder

# No check for a newer albumentations over the network each time the stage starts.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# albumentations imports its tensor helpers (`albumentations.pytorch`, and with them torch:
# 1.3 s) whenever torch is installed. augment works on NumPy arrays only; without the module
# albumentations skips them.
sys.modules.setdefault("albumentations.pytorch", None)
import albumentations as A  # noqa: E402

PREVIEW_IMAGES = 8


# The transforms each policy adds to the shared ones (shift, scale, rotation, brightness and
# contrast): flips and quarter turns only where they keep the label.
FLIPS = {
    "document": lambda: [],
    "photo": lambda: [A.HorizontalFlip(p=0.5)],
    "texture": lambda: [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)],
}


def build_policy(augment: AugmentParams, seed: int, source: str = "") -> A.Compose:
    """The augmentation policy named by `augment.policy` (`auto`: by the data source). `seed`
    makes the sequence of draws repeatable (albumentations keeps its own generator; global
    seeds do not reach it)."""
    name = policy_name(augment, source)
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
            *FLIPS[name](),
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
        tqdm(
            total=len(images) * copies,
            desc="augment",
            unit="img",
            mininterval=2,
            disable=copies == 0,  # nothing to draw (on-the-fly augmentation)
        ) as bar,
    ):
        for rows in chunks:
            writer.append(np.asarray(images[rows]), labels[rows])
        for _ in range(copies):
            for rows in chunks:
                extra = augmented_copies(np.asarray(images[rows]), policy, 1)
                writer.append(extra, labels[rows])
                bar.update(len(extra))


def run(params: Params, recorder: Recorder) -> None:
    augment = params.augment
    train = store.read_split(PREPARED, "train")
    images, labels = train.images, train.labels
    policy = build_policy(augment, params.seed, params.data.source)
    started = time.perf_counter()
    augmentation = store.Augmentation(
        policy_dict=A.to_dict(policy),
        on_the_fly=augment.on_the_fly,
        originals=len(images),
        views=1 + augment.copies,
    )
    with store.atomic_dir(AUGMENTED) as staging:
        write_augmented(images, labels, policy, augment.copies, staging)
        store.write_json(staging / AUGMENTATION.name, augmentation.model_dump())
    seconds = time.perf_counter() - started
    extra = len(images) * augment.copies
    recorder.log_metrics(
        {
            "images.train": len(images) + extra,
            "images_per_second": extra / seconds if extra else 0.0,
        }
    )
    recorder.log_dict(augmentation.policy_dict, "policy.json")
    when = "every epoch, on the fly" if augment.on_the_fly else "never again"
    recorder.describe(
        f"The policy `{policy_name(augment, params.data.source)}` (`policy.json`), drawn {when}; "
        f"the train split ({len(images)} images) and {augment.copies} offline "
        f"cop{'y' if augment.copies == 1 else 'ies'} of each."
    )
    shown = np.asarray(images[:PREVIEW_IMAGES])
    recorder.log_augmentation_preview(shown, augmented_copies(shown, policy, 1))
    print(
        f"wrote the {policy_name(augment, params.data.source)} policy, {len(images)} train "
        f"images and {extra} augmented copies to {AUGMENTED}"
    )


def policy_name(augment: AugmentParams, source: str) -> str:
    return rules.policy_for(source) if augment.policy == "auto" else augment.policy
