"""Where every stage reads and writes, and which params it reads.

This table is the one place for those facts: stages import their paths from here (never from
each other), each stage logs exactly its params to MLflow and keys its checkpoint by them
(`stage_params`), and `tests/test_layout.py` checks `dvc.yaml` against it, code deps included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PARAMS_FILE = Path("params.yaml")
PRESETS = Path("presets")  # named sets of overrides, e.g. presets/tiny.yaml
PREPARED = Path("data/prepared")
AUGMENTED = Path("data/augmented")
PREPARE_REPORT = Path("reports/prepare.json")
EVALUATION = Path("reports/evaluate")
FIGURES = Path("reports/figures")
REPORT = Path("reports/report.md")
CHECKPOINTS = Path("checkpoints")


@dataclass(frozen=True)
class TrainedModel:
    """One of the two models the pipeline trains. `name` is what the report, evaluate's metrics
    and the registry call it; `stage` is the DVC stage (and MLflow run) that trains it."""

    name: str
    stage: str
    folder: Path  # weights.pt + meta.json
    reports: Path  # metrics.json + history.csv

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINTS / self.stage / "last.pt"

    @property
    def history(self) -> Path:
        return self.reports / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"


SCRATCH = TrainedModel("scratch", "train", Path("models/scratch"), Path("reports/train"))
TRANSFER = TrainedModel("transfer", "transfer", Path("models/transfer"), Path("reports/transfer"))
TRAINED = (SCRATCH, TRANSFER)


@dataclass(frozen=True)
class Stage:
    """A DVC stage as `dvc.yaml` must declare it. `params` are `params.yaml` keys (a whole
    section or `section.key`); `deps` the data it reads (its code deps follow from its
    imports); `outs` what DVC caches, `committed` the small files kept in git
    (`cache: false`) so a fresh clone has a baseline to compare against."""

    name: str
    params: tuple[str, ...]
    deps: tuple[Path, ...] = ()
    outs: tuple[Path, ...] = ()
    committed: tuple[Path, ...] = ()
    persist: tuple[Path, ...] = ()


def _training(model: TrainedModel) -> Stage:
    return Stage(
        model.stage,
        params=("seed", "data.source", "data.image_size", model.stage),
        deps=(PREPARED, AUGMENTED),
        outs=(model.folder,),
        committed=(model.metrics, model.history),
        persist=(CHECKPOINTS / model.stage,),
    )


STAGES = {
    stage.name: stage
    for stage in (
        Stage(
            "prepare",
            # every data key but data.workers, which changes the speed, not the output
            params=(
                "seed",
                "data.source",
                "data.image_size",
                "data.val_fraction",
                "data.test_fraction",
                "data.on_bad_image",
                "tracking.log_images",
            ),
            outs=(PREPARED, PREPARE_REPORT),
        ),
        Stage(
            "augment",
            params=("seed", "augment", "tracking.log_images"),
            deps=(PREPARED,),
            outs=(AUGMENTED,),
        ),
        _training(SCRATCH),
        _training(TRANSFER),
        Stage(
            "evaluate",
            params=(
                "seed",  # draws the membership audit's members and non-members
                "data.source",
                "evaluate",
                "tracking.registered_model",
                "tracking.log_images",
            ),
            deps=(
                PREPARED,
                PREPARE_REPORT,
                *(m.folder for m in TRAINED),
                *(m.history for m in TRAINED),
            ),
            committed=(
                EVALUATION / "metrics.json",
                EVALUATION / "per_class.csv",
                *(EVALUATION / f"predictions_{m.name}.csv" for m in TRAINED),
                FIGURES,
                REPORT,
            ),
        ),
        # No outputs: DVC's run-cache never restores it, so it runs once for every `dvc repro`
        # or `dvc exp run` that changed any param or result, cached stages or not.
        Stage(
            "record",
            params=("seed", "data", "augment", "train", "transfer", "evaluate", "tracking"),
            deps=(*(m.metrics for m in TRAINED), EVALUATION / "metrics.json", REPORT),
        ),
    )
}


# What identifies an evaluation: its scores and its report (with the latencies it measured).
EVALUATED = (EVALUATION / "metrics.json", REPORT)


def stage_params(stage: str, params) -> dict[str, object]:
    """The params `stage` reads, as MLflow logs them and its checkpoint is keyed: each key
    named relative to its section (`train.lr` -> `lr`, `data.image_size` -> `image_size`,
    `train.privacy.epsilon` -> `privacy.epsilon`), so the train and transfer runs share names
    (`model`, `epochs`, `lr`, ...) and line up in MLflow's Compare view."""
    flat: dict[str, object] = {}
    for key in STAGES[stage].params:
        section, _, field = key.partition(".")
        value = getattr(params, section)
        if field:
            value = getattr(value, field)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        for name, leaf in flatten(value, field or ("" if isinstance(value, dict) else section)):
            if name in flat:
                raise ValueError(f"stage {stage} reads two params named '{name}'")
            flat[name] = leaf
    return flat


def flatten(value: object, name: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted name, leaf value) pairs."""
    if not isinstance(value, dict):
        return [(name, value)]
    return [
        pair for key, inner in value.items() for pair in flatten(inner, f"{name}.{key}".lstrip("."))
    ]
