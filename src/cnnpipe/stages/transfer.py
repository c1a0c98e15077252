"""transfer: fine-tune an ImageNet-pretrained backbone with a new head.

First `frozen_epochs` train the head alone; then `finetune_epochs` train everything, the
backbone at the lower `backbone_lr`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cnnpipe import engine, models, tracking
from cnnpipe.models import TransferNet
from cnnpipe.params import Params
from cnnpipe.stages import shared

MODEL_DIR = Path("models/transfer")
REPORT_DIR = Path("reports/transfer")


def _cosine(optimizer: torch.optim.Optimizer, trainer: engine.Trainer, epochs: int):
    steps = epochs * trainer.steps_per_epoch()
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


def fit(model: TransferNet, trainer: engine.Trainer, params: Params) -> None:
    transfer = params.transfer
    if transfer.frozen_epochs:
        model.freeze_backbone(True)
        head = torch.optim.AdamW(
            model.head_parameters(), lr=transfer.head_lr, weight_decay=transfer.weight_decay
        )
        trainer.run(head, transfer.frozen_epochs, _cosine(head, trainer, transfer.frozen_epochs))
    if transfer.finetune_epochs:
        model.freeze_backbone(False)
        everything = torch.optim.AdamW(
            [
                {"params": model.backbone_parameters(), "lr": transfer.backbone_lr},
                {"params": model.head_parameters(), "lr": transfer.head_lr},
            ],
            weight_decay=transfer.weight_decay,
        )
        schedule = _cosine(everything, trainer, transfer.finetune_epochs)
        trainer.run(everything, transfer.finetune_epochs, schedule)


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
    upstream = shared.upstream_runs(experiment)
    with tracking.stage_run("transfer", experiment, logged, transfer.backbone, upstream) as mlrun:
        train_split, val_split, classes = shared.fit_data()
        engine.seed_everything(params.seed)
        model = models.create_model(
            transfer.backbone,
            num_classes=len(classes),
            image_size=params.data.image_size,
            input_size=transfer.input_size,
            pretrained=transfer.weights == "imagenet",
        )
        mean, std = models.normalisation(transfer.backbone)
        trainer = engine.Trainer(
            model,
            train_split,
            val_split,
            engine.Normalisation(mean, std),
            engine.resolve_device(transfer.device),
            transfer.batch_size,
            params.seed,
            on_epoch=shared.log_epoch(mlrun),
        )
        fit(model, trainer, params)
        meta = {
            "architecture": transfer.backbone,
            "classes": classes,
            "image_size": params.data.image_size,
            "input_size": transfer.input_size,
            "mean": list(mean),
            "std": list(std),
        }
        shared.publish(trainer, mlrun, MODEL_DIR, REPORT_DIR, meta)
