"""train: fit a CNN from scratch (`train.model`: seed_cnn or small_cnn) with Adam."""

from __future__ import annotations

from pathlib import Path

import torch

from cnnpipe import engine, models, store, tracking
from cnnpipe.params import Params
from cnnpipe.stages import shared
from cnnpipe.stages.prepare import PREPARED

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
    fingerprints = shared.input_fingerprints()
    upstream = shared.upstream_runs(experiment, fingerprints)
    runtime = engine.start_runtime(train.device)
    with tracking.stage_run("train", experiment, logged, train.model, upstream) as mlrun:
        classes = store.read_classes(PREPARED)
        engine.make_deterministic(params.seed, train.deterministic)
        model = models.create_model(
            train.model, num_classes=len(classes), image_size=params.data.image_size
        )
        trainer = shared.make_trainer(
            model,
            train.model,
            train,
            params.seed,
            runtime,
            shared.checkpoint("train", logged, fingerprints),
            mlrun,
        )
        optimizer = torch.optim.Adam(
            model.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=train.lr, total_steps=train.epochs * trainer.steps_per_epoch()
        )
        trainer.run(optimizer, train.epochs, schedule)
        meta = shared.model_meta(train.model, classes, params.data.image_size)
        shared.publish(trainer, mlrun, MODEL_DIR, REPORT_DIR, meta)
    engine.stop_runtime(runtime)
