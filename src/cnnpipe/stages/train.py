"""train: fit a CNN from scratch (`train.model`: seed_cnn or small_cnn) with Adam and a
one-cycle learning-rate schedule. Writes the scratch model (`models/scratch`).

With `train.privacy.epsilon` set, DP-SGD instead (privacy.py): every weight learns, from the
un-augmented train split, with Adam at a constant learning rate, at `train.privacy`'s epochs, batch
size and learning rate; small_cnn is built without batch norm for it (`networks.build`).
"""

from __future__ import annotations

import torch

from cnnpipe import fit, layout, networks
from cnnpipe.params import Params, TrainParams


def phases(train: TrainParams) -> list[fit.Phase]:
    if train.privacy.enabled:
        private = train.privacy
        return [
            fit.Phase(
                "private",
                private.epochs,
                optimizer=lambda model: torch.optim.Adam(
                    model.parameters(), lr=private.lr, weight_decay=train.weight_decay
                ),
                schedule=None,  # constant: decayed, it learnt less here (docs/benchmarks.md)
                privacy=private,
            )
        ]
    return [
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
    ]


def run(params: Params) -> None:
    train = params.train
    fit.run(
        fit.Recipe(
            layout.SCRATCH,
            train,
            build=lambda classes: networks.build(
                train.model,
                num_classes=classes,
                image_size=params.data.image_size,
                private=train.privacy.enabled,
            ),
            phases=phases(train),
        ),
        params,
    )
