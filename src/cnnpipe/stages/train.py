"""train: fit a CNN from scratch (`train.model`: seed_cnn or small_cnn) with Adam, a linear
warm-up and cosine decay. Writes the scratch model (`models/scratch`).

With `train.privacy.epsilon` set, DP-SGD instead (privacy.py): every weight learns, from the
original train images, with Adam at a constant learning rate, at `train.privacy`'s epochs,
batch size and learning rate; small_cnn is built without batch norm for it (`networks.build`).
"""

from __future__ import annotations

import torch

from cnnpipe import fit, layout, networks, store
from cnnpipe.params import Params, TrainParams
from cnnpipe.recorder import Recorder


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
                decay=False,  # constant: decayed, it learnt less here (docs/benchmarks.md)
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
            warmup_epochs=train.warmup_epochs,
        )
    ]


def run(params: Params, recorder: Recorder) -> None:
    train = params.train
    image_size = store.image_size(layout.PREPARED)
    fit.run(
        fit.Recipe(
            layout.SCRATCH,
            train,
            build=lambda classes: networks.build(
                train.model,
                num_classes=classes,
                image_size=image_size,
                private=train.privacy.enabled,
            ),
            phases=phases(train),
        ),
        params,
        recorder,
    )
