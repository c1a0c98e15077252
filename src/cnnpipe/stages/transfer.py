"""transfer: fine-tune an ImageNet-pretrained backbone (`transfer.model`) with a new head.
Writes the transfer model (`models/transfer`).

The first `frozen_epochs` train the head alone, the backbone frozen; the rest train
everything, the backbone at the lower `backbone_lr`, after `warmup_epochs` of linear warm-up.
AdamW, cosine decay within each phase. Images are resized inside the model to
`transfer.input_size` (`auto`: `rules.transfer_input_size`, from the backbone's pretraining
size).

With `transfer.privacy.epsilon` set, DP-SGD trains only the new head, on the frozen backbone's
features of each train image's views (privacy.py), with momentum SGD and a cosine schedule at
`transfer.privacy`'s epochs, batch size and learning rate.
"""

from __future__ import annotations

import torch

from cnnpipe import fit, layout, networks, rules, store
from cnnpipe.networks import TransferNet
from cnnpipe.params import Params, TransferParams
from cnnpipe.recorder import Recorder


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

    return [
        fit.Phase("frozen", transfer.frozen_epochs, head_only),
        fit.Phase(
            "finetune",
            transfer.epochs - transfer.frozen_epochs,
            everything,
            warmup_epochs=transfer.warmup_epochs,
        ),
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
            privacy=private,
        )
    ]


def input_size(transfer: TransferParams, image_size: int, train_images: int) -> int:
    if transfer.input_size != "auto":
        return transfer.input_size
    pretrained = networks.pretrained_size(transfer.model)
    return rules.transfer_input_size(pretrained, image_size, train_images)


def run(params: Params, recorder: Recorder) -> None:
    transfer = params.transfer
    image_size = store.image_size(layout.PREPARED)
    train_images = len(store.read_split(layout.AUGMENTED, "train"))
    size = input_size(transfer, image_size, train_images)
    fit.run(
        fit.Recipe(
            layout.TRANSFER,
            transfer,
            build=lambda classes: networks.build(
                transfer.model,
                num_classes=classes,
                image_size=image_size,
                input_size=size,
                pretrained=transfer.weights == "imagenet",
            ),
            phases=private_phases(transfer) if transfer.privacy.enabled else phases(transfer),
            meta={"input_size": size},
            size_param="transfer.input_size",
        ),
        params,
        recorder,
    )
