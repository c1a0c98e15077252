"""transfer: fine-tune an ImageNet-pretrained backbone (`transfer.model`) with a new head.
Writes the transfer model (`models/transfer`).

The first `frozen_epochs` train the head alone, the backbone frozen; the rest train
everything, the backbone at the lower `backbone_lr`. AdamW, cosine decay within each phase.

With `transfer.privacy.epsilon` set, DP-SGD trains only the new head, on the frozen backbone's
features of each train image and its augmented copies (privacy.py), with momentum SGD and a
cosine schedule at `transfer.privacy`'s epochs, batch size and learning rate.
"""

from __future__ import annotations

import torch

from cnnpipe import fit, layout, networks
from cnnpipe.networks import TransferNet
from cnnpipe.params import Params, TransferParams


def phases(transfer: TransferParams) -> list[fit.Phase]:
    def head_only(model: TransferNet) -> torch.optim.Optimizer:
        model.freeze_backbone(True)
        return torch.optim.AdamW(
            model.head_parameters(), lr=transfer.lr, weight_decay=transfer.weight_decay, fused=True
        )

    def everything(model: TransferNet) -> torch.optim.Optimizer:
        model.freeze_backbone(False)
        groups = [
            {"params": model.backbone_parameters(), "lr": transfer.backbone_lr},
            {"params": model.head_parameters(), "lr": transfer.lr},
        ]
        return torch.optim.AdamW(groups, weight_decay=transfer.weight_decay, fused=True)

    cosine = torch.optim.lr_scheduler.CosineAnnealingLR
    return [
        fit.Phase("frozen", transfer.frozen_epochs, head_only, cosine),
        fit.Phase("finetune", transfer.epochs - transfer.frozen_epochs, everything, cosine),
    ]


def private_phases(transfer: TransferParams) -> list[fit.Phase]:
    """One phase; its optimiser is made for the head alone (fit.fit_head)."""
    private = transfer.privacy
    return [
        fit.Phase(
            "private head",
            private.epochs,
            optimizer=lambda head: torch.optim.SGD(
                head.parameters(), lr=private.lr, momentum=0.9, weight_decay=transfer.weight_decay
            ),
            schedule=torch.optim.lr_scheduler.CosineAnnealingLR,
            privacy=private,
        )
    ]


def run(params: Params) -> None:
    transfer = params.transfer
    fit.run(
        fit.Recipe(
            layout.TRANSFER,
            transfer,
            build=lambda classes: networks.build(
                transfer.model,
                num_classes=classes,
                image_size=params.data.image_size,
                input_size=transfer.input_size,
                pretrained=transfer.weights == "imagenet",
            ),
            phases=private_phases(transfer) if transfer.privacy.enabled else phases(transfer),
            meta={"input_size": transfer.input_size},
        ),
        params,
    )
