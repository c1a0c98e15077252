"""The stage table: every stage's name, code, params, inputs and outputs.

This table is the one place for those facts. Stages import their paths from here (never from
each other); the stage runner (`cli.py`) opens each stage's MLflow run from it: its name, the
params it logs (`stage_params`), the upstream runs (`upstream`) and the outputs whose
fingerprint identifies the run. `dvc.yaml` is checked against it by `tests/test_layout.py`,
code deps included (the modules a stage imports that can change its outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PARAMS_FILE = Path("params.yaml")
PRESETS = Path("presets")  # named sets of overrides, e.g. presets/tiny.yaml
PREPARED = Path("data/prepared")
AUGMENTED = Path("data/augmented")
AUGMENTATION = AUGMENTED / "augmentation.json"  # the policy and the train split's layout
PREPARE_REPORT = Path("reports/prepare.json")
EVALUATION = Path("reports/evaluate")
FIGURES = Path("reports/figures")
REPORT = Path("reports/report.md")
CHECKPOINTS = Path("checkpoints")
CHOSEN = EVALUATION / "chosen.json"  # the model evaluate chose, as the registry receives it


@dataclass(frozen=True)
class TrainedModel:
    """One of the two models the pipeline trains. `name` is what the report, evaluate's metrics
    and the registry call it; `stage` is the DVC stage (and MLflow run) that trains it."""

    name: str
    stage: str
    folder: Path  # weights.pt + meta.json
    reports: Path  # metrics.json + history.csv + host.json

    @property
    def checkpoint(self) -> Path:
        return CHECKPOINTS / self.stage / "last.pt"

    @property
    def history(self) -> Path:
        return self.reports / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def host(self) -> Path:
        """The machine that trained the model (runtime.host_record): where its bytes come from."""
        return self.reports / "host.json"


SCRATCH = TrainedModel("scratch", "train", Path("models/scratch"), Path("reports/train"))
TRANSFER = TrainedModel("transfer", "transfer", Path("models/transfer"), Path("reports/transfer"))
TRAINED = (SCRATCH, TRANSFER)


@dataclass(frozen=True)
class Stage:
    """A DVC stage as `dvc.yaml` must declare it. `params` are `params.yaml` keys (a whole
    section or `section.key`); `deps` the data it reads (its code deps follow from its
    imports); `outs` what DVC caches, `committed` the small files kept in git
    (`cache: false`) so a fresh clone has a baseline to compare against.

    For its MLflow run: `identity` are the outputs whose fingerprint tags the run (a later
    stage that reads them finds it by that); `model_param` names the param whose value
    follows the stage's name in the run's name (`train-small_cnn`); `trains` asks for
    system metrics (CPU, memory, GPU) while it runs."""

    name: str
    params: tuple[str, ...]
    deps: tuple[Path, ...] = ()
    outs: tuple[Path, ...] = ()
    committed: tuple[Path, ...] = ()
    persist: tuple[Path, ...] = ()
    identity: tuple[Path, ...] = ()
    model_param: str | None = None
    trains: bool = False
    # The module whose `run(params, recorder)` is the stage (default cnnpipe.stages.<name>);
    # one outside `cnnpipe.stages` is MLflow's own and makes its run itself: `run(params)`.
    module: str = ""
    # Run by every `dvc repro`: its state (the MLflow store) is outside DVC's view.
    always_changed: bool = False

    @property
    def entry(self) -> str:
        return self.module or f"cnnpipe.stages.{self.name}"

    @property
    def recorded(self) -> bool:
        """Whether the runner opens its MLflow run and hands it a recorder."""
        return self.entry.startswith("cnnpipe.stages.")


def _training(model: TrainedModel) -> Stage:
    return Stage(
        model.stage,
        params=("seed", "data.source", "data.resize", model.stage),
        deps=(PREPARED, AUGMENTED),
        outs=(model.folder,),
        committed=(model.metrics, model.history, model.host),
        persist=(CHECKPOINTS / model.stage,),
        identity=(model.folder,),
        model_param=f"{model.stage}.model",
        trains=True,
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
                "data.resize",
                "data.val_fraction",
                "data.test_fraction",
                "data.on_bad_image",
            ),
            outs=(PREPARED, PREPARE_REPORT),
            identity=(PREPARED,),
        ),
        Stage(
            "augment",
            params=("seed", "data.source", "augment"),  # data.source: `augment.policy: auto`
            deps=(PREPARED,),
            outs=(AUGMENTED,),
            identity=(AUGMENTED,),
        ),
        _training(SCRATCH),
        _training(TRANSFER),
        Stage(
            "evaluate",
            params=(
                "seed",  # draws the membership audit's members and non-members
                "data.source",
                "evaluate",
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
                CHOSEN,
                EVALUATION / "per_class.csv",
                *(EVALUATION / f"predictions_{m.name}.csv" for m in TRAINED),
                FIGURES,
                REPORT,
            ),
            identity=(EVALUATION / "metrics.json", CHOSEN, REPORT),
        ),
        # MLflow's side of the pipeline: the pipeline run and the registry (record.py). The
        # store is outside DVC's view, so it runs on every `dvc repro` (a fresh clone's too,
        # whose other stages DVC skips) and does nothing when the store already holds this
        # execution.
        Stage(
            "record",
            params=("seed", "data", "augment", "train", "transfer", "evaluate", "tracking"),
            deps=(
                PREPARED,
                *(m.metrics for m in TRAINED),
                EVALUATION / "metrics.json",
                CHOSEN,
                REPORT,
            ),
            module="cnnpipe.record",
            always_changed=True,
        ),
    )
}


def upstream(stage: Stage) -> list[Stage]:
    """The stages whose identifying outputs `stage` reads: its MLflow run links to theirs."""
    return [
        other
        for other in STAGES.values()
        if other.identity and set(other.identity) <= set(stage.deps)
    ]


def stage_params(stage: str, params) -> dict[str, object]:
    """The params `stage` reads, as MLflow logs them and its checkpoint is keyed: each key
    named relative to its section (`train.lr` -> `lr`, `data.image_size` -> `image_size`,
    `train.privacy.epsilon` -> `privacy.epsilon`), so the train and transfer runs share names
    (`model`, `epochs`, `lr`, ...) and line up in MLflow's Compare view."""
    flat: dict[str, object] = {}
    for key in STAGES[stage].params:
        section, _, field = key.partition(".")
        value = param_value(params, key)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        for name, leaf in flatten(value, field or ("" if isinstance(value, dict) else section)):
            if name in flat:
                raise ValueError(f"stage {stage} reads two params named '{name}'")
            flat[name] = leaf
    return flat


def param_value(params, key: str) -> object:
    """The value of a `params.yaml` key (`train.model`, `seed`) in the typed params."""
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    return value


def flatten(value: object, name: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted name, leaf value) pairs."""
    if not isinstance(value, dict):
        return [(name, value)]
    return [
        pair for key, inner in value.items() for pair in flatten(inner, f"{name}.{key}".lstrip("."))
    ]
