"""The trial side of `cnnpipe tune`: what a stage does when it runs as a trial of a study.

`cnnpipe tune` runs each trial as a DVC experiment (`dvc exp run --temp`) with the environment
variable `CNNPIPE_TRIAL` set: the study's storage and name, the trial and the pruner. DVC
passes its environment to every stage it runs, so the training stages report each epoch's val
score to the trial (`epoch_reporter`) and stop early when the pruner says so, and `record`
makes its pipeline run a child of the study's MLflow run (`pipeline_tags`). Without the
variable (`dvc repro`, `dvc exp run`, a reproduced trial) none of this happens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from cnnpipe import layout, store

TRIAL_ENV = "CNNPIPE_TRIAL"
# A stage's epochs are the trial's steps; the transfer stage's are counted from here, so that
# the pruner compares each stage's epochs with the same stage's epochs of the other trials
# (an epoch count is at most 1000: params.py).
STAGE_STEP_OFFSET = {"train": 0, "transfer": 1000}
TARGET_STAGES = {
    "champion": ("train", "transfer"),
    "scratch": ("train",),
    "transfer": ("transfer",),
}
PRUNED_KEY = "pruned_at_epoch"  # in a training stage's metrics.json and MLflow run
PRUNED_ATTR = "pruned"  # the trial's user attribute: {"stage": ..., "epoch": ...}


@dataclass(frozen=True)
class TrialLink:
    """What a stage needs to find its trial: `CNNPIPE_TRIAL`'s JSON."""

    storage: str  # an SQLAlchemy URL (SQLite file: absolute)
    study: str
    trial_id: int
    number: int
    metric: str  # val_accuracy | val_loss
    target: str  # champion | scratch | transfer
    pruner: str  # median | hyperband | none
    startup_trials: int
    warmup_epochs: int
    parent_run: str | None  # the study's MLflow run

    def to_env(self) -> dict[str, str]:
        return {TRIAL_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> TrialLink | None:
        text = os.environ.get(TRIAL_ENV)
        return cls(**json.loads(text)) if text else None


def direction(metric: str) -> str:
    return "minimize" if metric.endswith("loss") else "maximize"


def make_pruner(name: str, startup_trials: int):
    """The Optuna pruner named `name`. Warm-up is counted per stage by `EpochReporter`."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


class EpochReporter:
    """Called after each epoch of a training stage with the epoch and its val score (the
    `metric` attribute names which one): reports it to the trial and answers whether the stage
    should stop now. It stops when the pruner says so, when an earlier stage of the trial was
    pruned, and when the trial is no longer running (its worker was killed and the trial
    failed: the study retries it elsewhere)."""

    def __init__(self, link: TrialLink, stage: str) -> None:
        import optuna

        self.link, self.stage, self.metric = link, stage, link.metric
        self.study = optuna.load_study(
            study_name=link.study,
            storage=link.storage,
            pruner=make_pruner(link.pruner, link.startup_trials),
        )
        self.trial = optuna.trial.Trial(self.study, link.trial_id)

    def __call__(self, epoch: int, val_score: float) -> bool:
        from optuna.trial import TrialState

        storage = self.study._storage
        frozen = storage.get_trial(self.link.trial_id)
        if frozen.state != TrialState.RUNNING or PRUNED_ATTR in frozen.user_attrs:
            return True
        if self.stage not in TARGET_STAGES[self.link.target]:
            return False
        self.trial.report(val_score, STAGE_STEP_OFFSET[self.stage] + epoch)
        if epoch > self.link.warmup_epochs and self.trial.should_prune():
            pruned = {"stage": self.stage, "epoch": epoch}
            storage.set_trial_user_attr(self.link.trial_id, PRUNED_ATTR, pruned)
            return True
        return False


def epoch_reporter(stage: str) -> EpochReporter | None:
    """The per-epoch reporter of `stage` (train | transfer) when this process runs as a trial
    of `cnnpipe tune`; None otherwise."""
    link = TrialLink.from_env()
    return EpochReporter(link, stage) if link else None


def pruned_models() -> dict[str, int]:
    """Model name -> the epoch its stage was pruned at, from the training stages' metrics."""
    found = {}
    for model in layout.TRAINED:
        if model.metrics.exists() and PRUNED_KEY in (values := store.read_json(model.metrics)):
            found[model.name] = values[PRUNED_KEY]
    return found


def pipeline_tags() -> dict[str, str]:
    """Tags for `record`'s pipeline run when it runs in a trial: a child of the study's run
    (`mlflow.parentRunId`), with the study, the trial and whether it was pruned."""
    link = TrialLink.from_env()
    if link is None:
        return {}
    pruned = pruned_models()
    tags = {
        "cnnpipe.study": link.study,
        "cnnpipe.trial": str(link.number),
        "cnnpipe.trial_state": "pruned" if pruned else "complete",
    }
    if pruned:
        tags["cnnpipe.pruned"] = ", ".join(f"{m} at epoch {e}" for m, e in pruned.items())
    if link.parent_run:
        tags["mlflow.parentRunId"] = link.parent_run
    return tags
