"""Typed params: one class per `params.yaml` section, validated before a stage does any work.

`params.yaml` is the only source of values: no field has a default here, so a missing section
or key is an error that names it, never a silent fallback. Types are strict (`true` is not an
epoch count), and a key written twice is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from cnnpipe import layout, models
from cnnpipe.errors import UserError
from cnnpipe.layout import PARAMS_FILE, PRESETS
from cnnpipe.store import read_small_file

SOURCE_PATTERN = re.compile(
    r"^(builtin:(digits|faces)|folder:.+|torchvision:(CIFAR10|CIFAR100|MNIST|FashionMNIST|KMNIST))$"
)
Device = Literal["auto", "cpu", "cuda"]
MIN_TRAIN_SHARE = 0.1  # of the images, left for training by data.val_fraction and test_fraction
LEARNING_RATE = Field(ge=1e-8, le=1)
MAX_DEPTH = 20  # levels of nested values in a params file (params.yaml has 3)
MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KiB (params.yaml: ~10 KiB)


def size_or_auto(low: int, high: int):
    """A size in pixels from `low` to `high`, or `auto` (resolved by a stage, rules.py)."""

    def check(value: object) -> int | str:
        if value != "auto" and not (type(value) is int and low <= value <= high):
            raise ValueError(f"must be auto or a whole number from {low} to {high}")
        return value

    return Annotated[object, AfterValidator(check)]


class Section(BaseModel):
    """Every float must be a finite number (`.inf` and `.nan` are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataParams(Section):
    source: str
    image_size: size_or_auto(8, 512)  # auto: rules.working_size
    resize: Literal["squash", "pad", "center_crop"]  # how a non-square image becomes square
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    on_bad_image: Literal["skip", "fail"]
    workers: int = Field(ge=0, le=256)

    @model_validator(mode="after")
    def _room_for_training(self) -> DataParams:
        train_share = 1 - self.val_fraction - self.test_fraction
        if train_share < MIN_TRAIN_SHARE:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction})"
                f" leave {train_share:.3g} of the images for training: lower them so that at"
                f" least {MIN_TRAIN_SHARE} is left"
            )
        return self

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
    policy: Literal["auto", "photo", "document", "texture"]
    on_the_fly: bool
    copies: int = Field(ge=0, le=50)
    rotate_limit: float = Field(ge=0, le=180)
    rotate_p: float = Field(ge=0, le=1)
    shift_limit: float = Field(ge=0, le=0.5)
    scale_limit: float = Field(ge=0, le=0.5)
    shift_scale_p: float = Field(ge=0, le=1)
    brightness_limit: float = Field(ge=0, le=1)
    contrast_limit: float = Field(ge=0, le=1)
    brightness_contrast_p: float = Field(ge=0, le=1)


def budget_or_off(value: object) -> float:
    """ε: 0 (not private) or a budget from 0.01 to 100. The bounds keep the noise calibration
    finite: below ε = 0.01 the noise needed grows without bound, above ε = 100 a fit is private
    in name only."""
    if not (type(value) in (int, float) and (value == 0 or 0.01 <= value <= 100)):
        raise ValueError("must be 0 (not private) or a budget from 0.01 to 100")
    return float(value)


def number_or_auto(low: float, below: float):
    """A number from `low` up to (not including) `below`, or `auto` (resolved by a stage)."""

    def check(value: object) -> float | str:
        if value != "auto" and not (type(value) in (int, float) and low <= value < below):
            raise ValueError(f"must be auto or a number from {low:g} up to {below:g}")
        return value

    return Annotated[object, AfterValidator(check)]


class PrivacyParams(Section):
    """A training stage's differentially private fit (`privacy.py`). Off while `epsilon` is
    0; on, the stage follows its private recipe with these epochs, batch size and learning
    rate instead of its own: DP-SGD wants far larger batches than ordinary training. Whether
    `delta` is below 1 / (training images) is checked when the images are counted."""

    epsilon: Annotated[object, AfterValidator(budget_or_off)]  # of the whole fit; 0: off
    delta: number_or_auto(1e-12, 1)  # auto: privacy.default_delta (below 1e-12: unbounded noise)
    max_grad_norm: float = Field(
        ge=1e-6, le=1000
    )  # each image's gradient is clipped to this L2 norm
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=65536)  # expected images per step (Poisson sampling)
    lr: float = Field(ge=1e-8, le=100)

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0


class FitParams(Section):
    """What every training stage has: the model from the table, the loop and where it runs."""

    STAGE: ClassVar[str]  # which stage's models `model` may name
    model: str
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=4096)
    lr: float = LEARNING_RATE
    weight_decay: float = Field(ge=0, le=1)
    device: Device
    deterministic: bool
    nproc: int = Field(ge=1, le=1024)
    warmup_epochs: int = Field(ge=0, le=1000)
    label_smoothing: float = Field(ge=0, lt=0.5)
    class_weights: Literal["auto", "balanced", "none"]
    mixup: float = Field(ge=0, le=10)
    cutmix: float = Field(ge=0, le=10)
    ema_decay: float = Field(ge=0, lt=1)
    patience: int = Field(ge=0, le=1000)
    precision: Literal["auto", "fp32", "bf16"]
    privacy: PrivacyParams

    @field_validator("model")
    @classmethod
    def _in_the_model_table(cls, model: str) -> str:
        allowed = models.names(cls.STAGE)
        if model not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return model

    @model_validator(mode="after")
    def _private_fit_possible(self) -> FitParams:
        if not self.privacy.enabled:
            return self
        stage = self.STAGE
        if models.MODELS[self.model].private is None:
            able = [name for name in models.names(stage) if models.MODELS[name].private]
            raise ValueError(
                f"{stage}.model {self.model} cannot train privately: choose one of "
                f"{', '.join(able)}, or set {stage}.privacy.epsilon: 0"
            )
        if self.nproc > 1:
            raise ValueError(
                f"{stage}.privacy.epsilon is set with {stage}.nproc = {self.nproc}: private "
                f"training runs in one process (set {stage}.nproc: 1)"
            )
        return self


class TrainParams(FitParams):
    STAGE: ClassVar[str] = "train"


class TransferParams(FitParams):
    STAGE: ClassVar[str] = "transfer"
    weights: Literal["imagenet", "none"]
    input_size: size_or_auto(16, 512)  # auto: rules.transfer_input_size
    frozen_epochs: int = Field(ge=0, le=1000)
    backbone_lr: float = LEARNING_RATE

    @model_validator(mode="after")
    def _frozen_within_epochs(self) -> TransferParams:
        if self.frozen_epochs > self.epochs:
            raise ValueError(
                f"frozen_epochs ({self.frozen_epochs}) cannot exceed epochs ({self.epochs})"
            )
        return self


class EvaluateParams(Section):
    batch_size: int = Field(ge=1, le=65536)
    select_metric: Literal["auto", "accuracy", "macro_f1", "roc_auc"]  # auto: rules.imbalanced
    tta: Literal["none", "hflip"]
    gradcam_images: int = Field(ge=0, le=64)
    misclassified_images: int = Field(ge=0, le=64)


class TrackingParams(Section):
    experiment: str = Field(min_length=1, max_length=200)
    registered_model: str = Field(min_length=1, max_length=200, pattern=r"^[\w.\- ]+$")
    log_images: bool

    @field_validator("experiment")
    @classmethod
    def _a_name_not_a_path(cls, experiment: str) -> str:
        """The experiment's artifacts go to `mlruns/<experiment>`: a name with a path in it
        would put them elsewhere."""
        if (
            experiment in (".", "..")
            or not experiment.isprintable()
            or set("/\\") & set(experiment)
        ):
            raise ValueError(
                "must be a plain name: printable characters without / or \\, not . or .."
            )
        return experiment


class SearchEntry(Section):
    """One param of a search space: `choices`, or a range `low`..`high` (integers when both
    are; `log` for a log scale, `step` for a grid of values); with `when`, sampled only in the
    trials where each named param, sampled earlier, took one of the listed values. Keys left
    out mean: not used (this is the one place where params.yaml keys may be left out)."""

    choices: list[bool | int | float | str | None] | None = Field(default=None, min_length=1)
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(default=None, gt=0)
    when: dict[str, list[bool | int | float | str | None]] = {}

    @model_serializer(mode="wrap")
    def _as_written(self, dump) -> dict:
        """Only the keys the entry was written with, as params.yaml holds it."""
        return {k: v for k, v in dump(self).items() if k in self.model_fields_set}

    @model_validator(mode="after")
    def _choices_or_range(self) -> SearchEntry:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either choices: [...] or low: and high:")
        if self.low is not None and self.high is not None:
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"log: true needs low > 0 (got {self.low})")
            if self.log and self.step is not None:
                raise ValueError("log: true and step cannot be combined")
        return self


class TuneParams(Section):
    """`cnnpipe tune`: an Optuna study whose trials are DVC experiments (tune.py). No stage
    reads this section: it changes which experiments run, not what a stage writes."""

    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    storage: str = Field(min_length=1)  # local: a SQLite file in the repository, or a URL
    trials: int = Field(ge=1, le=100_000)
    jobs: int = Field(ge=1, le=256)
    metric: Literal["val_accuracy", "val_loss"]
    target: Literal["champion", "scratch", "transfer"]
    sampler: Literal["tpe", "random", "grid"]
    pruner: Literal["median", "hyperband", "none"]
    startup_trials: int = Field(ge=0, le=100_000)
    warmup_epochs: int = Field(ge=0, le=1000)
    stale_after_s: int = Field(ge=2, le=86_400)
    space: dict[str, SearchEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _space_usable(self) -> TuneParams:
        earlier: list[str] = []
        for key, entry in self.space.items():
            if key.split(".")[0] == "tune":
                raise ValueError(f"space.{key}: the search cannot change the tune section")
            later = [name for name in entry.when if name not in earlier]
            if later:
                raise ValueError(
                    f"space.{key}: when names {', '.join(later)}, which must come earlier "
                    "in the space"
                )
            if self.sampler == "grid" and (entry.choices is None or entry.when):
                raise ValueError(
                    f"space.{key}: sampler grid needs choices for every param and no when"
                )
            earlier.append(key)
        return self


class Params(Section):
    seed: int = Field(ge=0, le=2**32 - 1)
    data: DataParams
    augment: AugmentParams
    train: TrainParams
    transfer: TransferParams
    evaluate: EvaluateParams
    tracking: TrackingParams
    tune: TuneParams


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key written twice in one mapping, any alias
    (`*name`: a few lines of nested aliases expand to billions of values) and values nested
    deeper than `MAX_DEPTH`, and reads `1e-3` as a number as YAML 1.2 does (PyYAML's YAML 1.1
    needs `1.0e-3`)."""

    depth = 0  # of the node being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self.check_event(yaml.AliasEvent):
            reason = "aliases (*name) are not allowed: write the value out"
            raise yaml.composer.ComposerError(None, None, reason, event.start_mark)
        if self.depth >= MAX_DEPTH:
            reason = f"values nested deeper than {MAX_DEPTH} levels"
            raise yaml.composer.ComposerError(None, None, reason, event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _describe(error: dict) -> str:
    """One line for one pydantic error: the dotted key, the bad value and what is allowed."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}' (remove it or check its spelling)"
    if error["type"] == "missing":
        return f"'{key}' is missing (add it; the repository's params.yaml lists every key)"
    if error["type"] == "value_error" and isinstance(error["input"], dict):
        # a check across the keys of a section: its message names them
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key} = {error['input']!r}: {error['msg']}"


def parse_value(text: str) -> object:
    """One value as params.yaml would hold it (`1e-3` a number, as in YAML 1.2)."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml(path: Path) -> object:
    """The parsed file, or a one-line `UserError` for a missing, unreadable or invalid one.
    Only a regular file of at most `MAX_PARAMS_BYTES` is read: a pipe would block the read
    and a device (/dev/zero) would never end it."""
    try:
        text = read_small_file(path, MAX_PARAMS_BYTES, "params file").decode("utf-8")
        return yaml.load(text, Loader=_StrictLoader)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run cnnpipe from the repository root") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a params file") from None
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (byte {err.start}): is it a binary file?"
        ) from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{path} holds a value that cannot be read: {err}") from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate `params.yaml`; a bad file raises `UserError` with a one-line reason."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections (seed, data, ...), not {raw!r:.40}")
    return validate(raw, str(path))


def validate(raw: dict, where: str) -> Params:
    """`raw` (params.yaml parsed) as `Params`, or a one-line `UserError`: `where`, then each
    problem."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise UserError(f"{where}: {problems}") from None


def with_overrides_checked(pairs: list[str], path: Path = PARAMS_FILE) -> Params:
    """The params `dvc exp run -S pairs` would run with, validated before anything is written:
    a misspelt key or a wrong value is a one-line `UserError` (DVC would write it into
    params.yaml and the stages would fail on it, one after another)."""
    load_params(path)  # the file as it is must be valid
    raw = read_yaml(path)
    return validate(with_overrides(raw, parse_overrides(pairs)), "the overrides")


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`-S key=value` options, values read as YAML (as `dvc exp run -S` reads them)."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"-S {pair}: write -S section.key=value (e.g. -S train.epochs=3)")
        found[key.strip()] = parse_value(value) if value else None
    return found


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """A copy of the parsed params.yaml with `section.key` overrides set; an unknown key is
    a UserError (dvc would add it, and the stages would refuse it)."""
    result = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        table = result
        for section in sections:
            table = table.get(section) if isinstance(table, dict) else None
        if not isinstance(table, dict) or leaf not in table:
            raise UserError(f"{key} is not a key of params.yaml (check its spelling)")
        table[leaf] = value
    return result


def preset(name: str, folder: Path = PRESETS) -> dict[str, object]:
    """The overrides of `presets/<name>.yaml` as `section.key` -> value (`dvc exp run -S`)."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise UserError(f"no preset '{name}' in {folder}/ (known: {known})")
    raw = read_yaml(path)
    return dict(layout.flatten(raw)) if isinstance(raw, dict) else {}
