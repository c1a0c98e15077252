"""train: fit a CNN from scratch (`train.model`: seed_cnn or small_cnn) with Adam."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnpipe import engine, models, tracking
from cnnpipe.params import Params
from cnnpipe.stages import shared

MODEL_DIR = Path("models/scratch")
REPORT_DIR = Path("reports/train")


def run(params: Params) -> None:
    train = params.train
    experiment = params.tracking.experiment
    logged = tracking.flatten(
        {
            "seed": params.seed,
            "data.image_size": params.data.image_size,
            "train": train.model_dump(),
        }
    )
    upstream = shared.upstream_runs(experiment)
    with tracking.stage_run("train", experiment, logged, train.model, upstream) as mlrun:
        train_split, val_split, classes = shared.fit_data()
        engine.seed_everything(params.seed)
        model = models.create_model(
            train.model, num_classes=len(classes), image_size=params.data.image_size
        )
        mean, std = models.normalisation(train.model)
        trainer = engine.Trainer(
            model,
            train_split,
            val_split,
            engine.Normalisation(mean, std),
            engine.resolve_device(train.device),
            train.batch_size,
            params.seed,
            on_epoch=shared.log_epoch(mlrun),
        )
        optimizer = torch.optim.Adam(
            model.parameters(), lr=train.lr, weight_decay=train.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=train.lr, total_steps=train.epochs * trainer.steps_per_epoch()
        )
        trainer.run(optimizer, train.epochs, schedule)
        meta = {
            "architecture": train.model,
            "classes": classes,
            "image_size": params.data.image_size,
            "mean": list(mean),
            "std": list(std),
        }
        shared.publish(trainer, mlrun, MODEL_DIR, REPORT_DIR, meta)
