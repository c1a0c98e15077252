"""transfer: fine-tune an ImageNet-pretrained backbone with a new head.

First `frozen_epochs` train the head alone; then `finetune_epochs` train everything, the
backbone at the lower `backbone_lr`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cnnpipe import engine, models, store, tracking
from cnnpipe.models import TransferNet
from cnnpipe.params import Params, TransferParams
from cnnpipe.stages import shared
from cnnpipe.stages.prepare import PREPARED

MODEL_DIR = Path("models/transfer")
REPORT_DIR = Path("reports/transfer")


def _cosine(optimizer: torch.optim.Optimizer, trainer: engine.Trainer, epochs: int):
    steps = epochs * trainer.steps_per_epoch()
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def fit(model: TransferNet, trainer: engine.Trainer, transfer: TransferParams) -> None:
    if transfer.frozen_epochs:
        model.freeze_backbone(True)
        head = torch.optim.AdamW(
            model.head_parameters(),
            lr=transfer.head_lr,
            weight_decay=transfer.weight_decay,
            fused=True,
        )
        schedule = _cosine(head, trainer, transfer.frozen_epochs)
        trainer.run(head, transfer.frozen_epochs, schedule, phase="frozen")
    if transfer.finetune_epochs:
        model.freeze_backbone(False)
        everything = torch.optim.AdamW(
            [
                {"params": model.backbone_parameters(), "lr": transfer.backbone_lr},
                {"params": model.head_parameters(), "lr": transfer.head_lr},
            ],
            weight_decay=transfer.weight_decay,
            fused=True,
        )
        schedule = _cosine(everything, trainer, transfer.finetune_epochs)
        trainer.run(everything, transfer.epochs, schedule, phase="finetune")


def run(params: Params) -> None:
    transfer = params.transfer
    experiment = params.tracking.experiment
    logged = tracking.flatten(
        {
            "seed": params.seed,
            "data.image_size": params.data.image_size,
            "transfer": transfer.model_dump(),
        }
    )
    fingerprints = shared.input_fingerprints()
    upstream = shared.upstream_runs(experiment, fingerprints)
    runtime = engine.start_runtime(transfer.device)
    with tracking.stage_run("transfer", experiment, logged, transfer.backbone, upstream) as mlrun:
        classes = store.read_classes(PREPARED)
        engine.make_deterministic(params.seed, transfer.deterministic)
        model = models.create_model(
            transfer.backbone,
            num_classes=len(classes),
            image_size=params.data.image_size,
            input_size=transfer.input_size,
            pretrained=transfer.weights == "imagenet",
        )
        trainer = shared.make_trainer(
            model,
            transfer.backbone,
            transfer,
            params.seed,
            runtime,
            shared.checkpoint("transfer", logged, fingerprints),
            mlrun,
        )
        fit(model, trainer, transfer)
        meta = shared.model_meta(
            transfer.backbone, classes, params.data.image_size, input_size=transfer.input_size
        )
        shared.publish(trainer, mlrun, MODEL_DIR, REPORT_DIR, meta)
    engine.stop_runtime(runtime)
