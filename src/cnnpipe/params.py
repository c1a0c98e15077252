"""Typed params: one class per `params.yaml` section, validated before a stage does any work."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cnnpipe.errors import UserError

PARAMS_FILE = Path("params.yaml")
SOURCE_PATTERN = re.compile(
    r"^(builtin:(digits|faces)|folder:.+|torchvision:(CIFAR10|CIFAR100|MNIST|FashionMNIST|KMNIST))$"
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: str = "builtin:digits"
    image_size: int = Field(32, ge=8, le=512)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    on_bad_image: Literal["skip", "fail"] = "skip"
    workers: int = Field(0, ge=0, le=256)

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if not SOURCE_PATTERN.match(source):
            raise ValueError(
                "must be builtin:digits, builtin:faces, folder:<path> or torchvision:<name>"
                " (CIFAR10, CIFAR100, MNIST, FashionMNIST, KMNIST)"
            )
        return source


class AugmentParams(Section):
    copies: int = Field(1, ge=0, le=50)
    rotate_limit: float = Field(10, ge=0, le=180)
    rotate_p: float = Field(0.5, ge=0, le=1)
    hflip_p: float = Field(0.0, ge=0, le=1)
    shift_limit: float = Field(0.1, ge=0, le=0.5)
    scale_limit: float = Field(0.1, ge=0, le=0.5)
    shift_scale_p: float = Field(0.5, ge=0, le=1)
    brightness_limit: float = Field(0.2, ge=0, le=1)
    contrast_limit: float = Field(0.2, ge=0, le=1)
    brightness_contrast_p: float = Field(0.5, ge=0, le=1)


class PrivacyParams(Section):
    """A stage's differentially private fit (`privacy.py`). Off while `epsilon` is null; on,
    the stage trains with these epochs, batch size and learning rate instead of its own, as
    DP-SGD wants far larger batches and more epochs than ordinary training. No defaults: the
    recipes differ per stage, so params.yaml holds each stage's values."""

    epsilon: float | None = Field(gt=0)  # the privacy budget for the whole fit; null: off
    delta: float | None = Field(gt=0, lt=1)  # null: 1 / (10 x training images)
    max_grad_norm: float = Field(gt=0)  # each image's gradient is clipped to this L2 norm
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=65536)  # expected images per step (Poisson sampling)
    lr: float = Field(gt=0, le=100)

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


class TrainParams(Section):
    model: Literal["seed_cnn", "small_cnn"] = "small_cnn"
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    nproc: int = Field(1, ge=1, le=1024)


class TransferParams(Section):
    backbone: Literal["efficientnet_lite0", "resnet18", "mobilenet_v3_small", "efficientnet_b0"] = (
        "efficientnet_lite0"
    )
    weights: Literal["imagenet", "none"] = "imagenet"
    input_size: int = Field(64, ge=16, le=512)
    frozen_epochs: int = Field(2, ge=0, le=1000)
    finetune_epochs: int = Field(3, ge=0, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    head_lr: float = Field(3e-3, gt=0, le=1)
    backbone_lr: float = Field(3e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    nproc: int = Field(1, ge=1, le=1024)

    @property
    def epochs(self) -> int:
        return self.frozen_epochs + self.finetune_epochs


class EvaluateParams(Section):
    batch_size: int = Field(256, ge=1, le=65536)
    select_metric: Literal["accuracy", "macro_f1", "roc_auc"] = "accuracy"
    gradcam_images: int = Field(8, ge=0, le=64)
    misclassified_images: int = Field(16, ge=0, le=64)


class TrackingParams(Section):
    experiment: str = Field("cnnpipe", min_length=1)
    registered_model: str = Field("cnnpipe-classifier", min_length=1)
    log_images: bool = True


class Params(Section):
    seed: int = Field(42, ge=0, le=2**32 - 1)
    data: DataParams = DataParams()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    transfer: TransferParams = TransferParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()

    @field_validator("transfer")
    @classmethod
    def _some_epochs(cls, transfer: TransferParams) -> TransferParams:
        if transfer.epochs < 1:
            raise ValueError("frozen_epochs + finetune_epochs must be at least 1")
        return transfer


def _describe(error: dict, raw: dict) -> str:
    """One line for one pydantic error: the dotted key, the bad value and what is allowed."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}' (remove it or check its spelling)"
    value = error.get("input", raw)
    return f"{key} = {value!r}: {error['msg']}"


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`; a bad file raises `UserError` with a one-line reason."""
    if not path.exists():
        raise UserError(f"{path} not found: run cnnpipe from the repository root")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e, raw) for e in err.errors())
        raise UserError(f"{path}: {problems}") from None
