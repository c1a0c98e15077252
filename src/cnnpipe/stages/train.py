"""train: fit a CNN from scratch (`train.model`: seed_cnn or small_cnn) with Adam and a
one-cycle learning-rate schedule. Writes the scratch model (`models/scratch`)."""

from __future__ import annotations

import torch

from cnnpipe import fit, layout, networks
from cnnpipe.params import Params


def run(params: Params) -> None:
    train = params.train
    fit.run(
        fit.Recipe(
            layout.SCRATCH,
            train,
            build=lambda classes: networks.build(
                train.model, num_classes=classes, image_size=params.data.image_size
            ),
            phases=[
                fit.Phase(
                    "fit",
                    train.epochs,
                    optimizer=lambda model: torch.optim.Adam(
                        model.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True
                    ),
                    schedule=lambda optimizer, steps: torch.optim.lr_scheduler.OneCycleLR(
                        optimizer, max_lr=train.lr, total_steps=steps
                    ),
                )
            ],
        ),
        params,
    )
