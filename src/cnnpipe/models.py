"""The model table: every network a stage can build, by name, and where it comes from.

Like timm's registry: an entry says which stage trains it, where the network and its ImageNet
weights come from and where its classifier head is. Normalisation is not written here: it is
read from the source's own metadata (timm's `pretrained_cfg`, torchvision's weights) when the
model is built (`networks.normalisation`). Adding a timm or torchvision backbone is one entry:

    "convnext_tiny": ModelSpec(
        "transfer", "torchvision:convnext_tiny", head="classifier.2", private="head"
    ),

This module imports no torch, so that every stage can validate params cheaply;
`networks.build(name, ...)` turns an entry into a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelSpec:
    stage: Literal["train", "transfer"]  # train: from scratch; transfer: a pretrained backbone
    source: str  # cnnpipe:<builder in networks.py> | timm:<model name> | torchvision:<model name>
    head: str | None = None  # the classifier's module path (timm models name it themselves)
    weights: str = "hub"  # ImageNet weights: hub (downloaded once) | package (shipped offline)
    # How it trains with differential privacy (the stage's `privacy` params):
    #   whole: DP-SGD on every weight, from scratch (built without batch norm, `networks.build`)
    #   head: DP-SGD on a new linear head over the frozen ImageNet backbone's features
    #   None: it cannot
    private: Literal["whole", "head"] | None = None
    # Trains faster in bf16 than in fp32 on a CPU with AMX or AVX-512 BF16 (measured,
    # docs/benchmarks.md); `precision: auto` uses bf16 there only for these.
    fast_in_bf16_on_cpu: bool = False
    summary: str = ""

    @property
    def library(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_name(self) -> str:
        return self.source.partition(":")[2]


MODELS: dict[str, ModelSpec] = {
    "seed_cnn": ModelSpec(
        "train",
        "cnnpipe:seed_cnn",
        private="whole",
        summary="the source document's CNN: conv 32@3x3, pool, 128",
    ),
    "small_cnn": ModelSpec(
        "train",
        "cnnpipe:small_cnn",
        private="whole",
        fast_in_bf16_on_cpu=True,
        summary="five 3x3 conv + batch-norm layers, global pooling",
    ),
    "efficientnet_lite0": ModelSpec(
        "transfer",
        "timm:tf_efficientnet_lite0",
        weights="package",
        private="head",
        summary="timm EfficientNet-Lite0, ImageNet weights from a package (works offline)",
    ),
    "resnet18": ModelSpec("transfer", "torchvision:resnet18", head="fc", private="head"),
    "mobilenet_v3_small": ModelSpec(
        "transfer", "torchvision:mobilenet_v3_small", head="classifier.3", private="head"
    ),
    "efficientnet_b0": ModelSpec(
        "transfer", "torchvision:efficientnet_b0", head="classifier.1", private="head"
    ),
}


def names(stage: str) -> list[str]:
    """The models `stage` (train or transfer) can build."""
    return [name for name, spec in MODELS.items() if spec.stage == stage]
