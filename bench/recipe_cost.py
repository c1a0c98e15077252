"""What each recipe option costs: images/s of one training pass of the loop.

Times `engine.Trainer.train_epoch` over random uint8 images (the pixels do not change the
work) for each configuration given as model:size:precision:ema:policy:frozen, e.g.

    uv run python bench/recipe_cost.py small_cnn:32:bf16:0:0:0 small_cnn:32:bf16:1:1:0 \\
        efficientnet_lite0:32:fp32:0:1:0 efficientnet_lite0:32:bf16:0:1:1

ema and policy are 0 or 1 (the photo policy of params.yaml's augment section, drawn on the
fly); frozen (1) trains only a transfer model's head. Run it on a quiet machine: the numbers
are throughput, not a test.
"""

from __future__ import annotations

import argparse

import albumentations as A
import numpy as np
import torch

from cnnpipe import engine, networks, store
from cnnpipe.params import load_params
from cnnpipe.runtime import Runtime
from cnnpipe.stages.augment import build_policy

NORM = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
SCRATCH = ("small_cnn", "seed_cnn")


def images_per_second(config: str, images: int, batch_size: int) -> float:
    name, size, precision, ema, policy, frozen = config.split(":")
    size, rng = int(size), np.random.default_rng(0)
    torch.manual_seed(0)
    pixels = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, images)
    model = networks.build(
        name, num_classes=10, image_size=size, input_size=size, pretrained=name not in SCRATCH
    )
    if frozen == "1":
        model.freeze_backbone(True)
    drawn = None
    if policy == "1":  # as the training stages get it: through augmentation.json's record
        photo = build_policy(load_params().augment.model_copy(update={"policy": "photo"}), 0)
        record = store.Augmentation(
            policy_dict=A.to_dict(photo), on_the_fly=True, originals=images, views=1
        )
        drawn = record.policy()
    options = engine.LoopOptions(batch_size, ema_decay=0.999 * (ema == "1"), precision=precision)
    cpu = torch.device("cpu")
    train = engine.ImageInputs(pixels, labels, NORM, cpu, drawn, 0)
    val = engine.ImageInputs(pixels[:batch_size], labels[:batch_size], NORM, cpu)
    trainer = engine.Trainer(model, train, val, Runtime(cpu), options, 0, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    trainer.train_epoch(model, optimizer, None, 1, iter([np.arange(batch_size)]))  # warm-up
    return trainer.train_epoch(model, optimizer, None, 2)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="model:size:precision:ema:policy:frozen")
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    for config in args.configs:
        speed = images_per_second(config, args.images, args.batch_size)
        print(f"{config:40s} {speed:8.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
