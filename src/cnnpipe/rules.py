"""The documented rules that turn `auto` params into values: one function each, used by the
stages that resolve them and by the tests that check them (README, "Automatic choices").

- Working image size (`data.image_size: auto`): the median of the images' shorter sides,
  rounded down to a multiple of 4 (small_cnn's two 2x2 poolings divide it evenly), at least 28
  and at most 128. 28 px is the MNIST family's own size, kept rather than upsampled (on
  Fashion-MNIST, small_cnn trains 1.3x faster at 28 px than at 32: docs/benchmarks.md);
  smaller images are upsampled to it, as the networks have too little left to pool below;
  above 128 px an epoch of a few thousand images no longer takes seconds on a laptop CPU. Pin
  a number to go beyond.
- Transfer input size (`transfer.input_size: auto`): the backbone's pretraining size (timm's
  `pretrained_cfg`, torchvision's weights metadata), capped at 128 px like the working size
  and at twice the working size (upsampling further adds pixels, not detail); and images are
  upsampled beyond the working size only while an epoch stays within 8.4 million input pixels
  (2^23: the digits' 1,167 train images at 56 px, twice their 28; 51,000 Fashion-MNIST images
  stay at 28 px, 4x less work per epoch than at 56).
- Imbalance: the classes are imbalanced when the largest has more than 1.5x the train images
  of the smallest. Then `class_weights: auto` weighs each class's loss by
  images / (classes x its images), the best epoch is the one with the best val balanced
  accuracy (mean per-class recall) instead of accuracy, and `evaluate.select_metric: auto`
  chooses the champion by test macro-F1 instead of accuracy.
- Augmentation policy (`augment.policy: auto`): `document` (no flips) for digits and
  handwriting sources, `photo` (horizontal flips) for everything else; inspection images,
  textures and micrographs, whose label survives any flip or quarter turn, want `texture`.
"""

from __future__ import annotations

import numpy as np

MIN_SIZE, MAX_SIZE = 28, 128
SIZE_STEP = 4
UPSAMPLED_PIXELS_PER_EPOCH = 2**23
IMBALANCE_RATIO = 1.5
DOCUMENT_SOURCES = ("builtin:digits", "torchvision:MNIST", "torchvision:KMNIST")


def working_size(shorter_sides: list[int]) -> int:
    """The image size for `data.image_size: auto`, from each image's shorter side."""
    median = int(np.median(shorter_sides)) if len(shorter_sides) else MIN_SIZE
    return int(np.clip(median // SIZE_STEP * SIZE_STEP, MIN_SIZE, MAX_SIZE))


def transfer_input_size(pretrained_size: int, image_size: int, train_images: int) -> int:
    """The transfer model's input size for `transfer.input_size: auto`."""
    affordable = int(np.sqrt(UPSAMPLED_PIXELS_PER_EPOCH / max(train_images, 1))) // 8 * 8
    return min(pretrained_size, MAX_SIZE, 2 * image_size, max(image_size, affordable))


def class_counts(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=classes)


def imbalanced(labels: np.ndarray, classes: int) -> bool:
    counts = class_counts(labels, classes)
    return counts.max() > IMBALANCE_RATIO * max(counts.min(), 1)


def balanced_class_weights(labels: np.ndarray, classes: int) -> np.ndarray:
    """images / (classes x images of each class): every class weighs as much in the loss."""
    counts = class_counts(labels, classes)
    return len(labels) / (classes * np.maximum(counts, 1))


def policy_for(source: str) -> str:
    """The augmentation policy for `augment.policy: auto`."""
    return "document" if source in DOCUMENT_SOURCES else "photo"
