"""One training recipe for both training stages: a network builder plus a list of phases.

`stages/train.py` and `stages/transfer.py` say which network to build and how each phase
optimises it. Everything else is here: the data they fit on (the augmented train split, the
untouched val split), the MLflow run and its upstream runs, the checkpoint and its key, the
trainer, and what a finished fit publishes (model folder, history, metrics, the logged model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cnnpipe import engine, layout, networks, plots, serving, store, tracking
from cnnpipe.engine import Trainer
from cnnpipe.params import Params, TrainingParams
from cnnpipe.store import Split


@dataclass(frozen=True)
class Phase:
    """Consecutive epochs trained with one optimiser and one learning-rate schedule."""

    name: str
    epochs: int
    # Makes the optimiser for the network; it also decides which parameters learn.
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    # Makes the schedule for that optimiser, stepped once per batch, over the phase's steps.
    schedule: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class Recipe:
    target: layout.TrainedModel
    settings: TrainingParams
    build: Callable[[int], nn.Module]  # number of classes -> a freshly initialised network
    phases: list[Phase]
    meta: dict = field(default_factory=dict)  # more model-folder facts, e.g. input_size


def fit_data() -> tuple[Split, Split, list[str]]:
    """Train on the augmented train split, choose the best epoch on the untouched val split."""
    train = store.read_split(layout.AUGMENTED, "train")
    val = store.read_split(layout.PREPARED, "val")
    return train, val, store.read_classes(layout.PREPARED)


def checkpoint(recipe: Recipe, logged_params: dict, fingerprints: dict) -> engine.Checkpoint:
    """The stage's checkpoint, keyed by every param the stage reads and its input data."""
    key = json.dumps([logged_params, fingerprints], sort_keys=True, default=str)
    return engine.Checkpoint(recipe.target.checkpoint, hashlib.sha256(key.encode()).hexdigest())


def run(recipe: Recipe, params: Params) -> None:
    """Fit `recipe` phase by phase (resuming from a checkpoint), then publish the best epoch."""
    stage, settings = recipe.target.stage, recipe.settings
    logged = layout.stage_params(stage, params)
    fingerprints = {
        "prepare": store.fingerprint(layout.PREPARED),
        "augment": store.fingerprint(layout.AUGMENTED),
    }
    upstream = tracking.find_runs(params.tracking.experiment, fingerprints)
    runtime = engine.start_runtime(settings.device)
    with tracking.stage_run(
        stage,
        params.tracking.experiment,
        logged,
        model=settings.model,
        upstream=upstream,
        system_metrics=True,
    ) as mlrun:
        train, val, classes = fit_data()
        mlrun.log_splits(
            {"train": train, "val": val}, classes, fingerprints["prepare"], params.data.source
        )
        engine.make_deterministic(params.seed, settings.deterministic, runtime.device)
        model = recipe.build(len(classes))
        mean, std = networks.normalisation(settings.model)
        trainer = Trainer(
            model,
            train,
            val,
            engine.Normalisation(mean, std),
            runtime,
            settings.batch_size,
            params.seed,
            settings.epochs,
            checkpoint(recipe, logged, fingerprints),
            on_epoch=lambda record, speed: mlrun.log_epoch(vars(record), speed),
        )
        until = 0
        for phase in recipe.phases:
            if phase.epochs:
                until += phase.epochs
                optimizer = phase.optimizer(model)
                schedule = phase.schedule(optimizer, phase.epochs * trainer.steps_per_epoch())
                trainer.run(optimizer, until, schedule, phase=phase.name)
        if runtime.is_main:
            meta = store.ModelMeta(
                architecture=settings.model,
                classes=classes,
                image_size=params.data.image_size,
                mean=mean,
                std=std,
                best_epoch=trainer.best.epoch,
                **recipe.meta,
            )
            publish(trainer, recipe.target, meta, mlrun)
    engine.stop_runtime(runtime)


def publish(trainer: Trainer, target: layout.TrainedModel, meta: store.ModelMeta, mlrun) -> None:
    """Write the best epoch's model folder, the history (a DVC plot) and the metrics, and log
    them with the model to the stage's MLflow run."""
    best = trainer.best
    store.write_model_folder(target.folder, trainer.best_model().cpu().state_dict(), meta)
    rows = engine.history_rows(trainer.history)
    store.write_csv(target.history, rows)
    best_metrics = {f"best_{k}": v for k, v in vars(best).items()}
    store.write_json_atomic(target.metrics, best_metrics)

    mlrun.set_fingerprint(store.fingerprint(target.folder))
    mlrun.log_metrics(best_metrics)
    figure = plots.learning_curves(rows, f"{target.name} ({meta.architecture})")
    mlrun.log_figure(figure, "learning_curves.png")
    plots.close(figure)
    examples = np.array(store.read_split(layout.PREPARED, "val").images[:4])
    mlrun.log_model(lambda: serving.log_model(target, examples))
    mlrun.describe(
        f"The **{target.name}** model: `{meta.architecture}`, {len(trainer.history)} epochs "
        f"on {len(trainer.train)} training images; best val accuracy "
        f"{best.val_accuracy:.4f} at epoch {best.epoch}. Written to `{target.folder}`, logged "
        f"as `{serving.logged_name(target, meta)}`; evaluate adds its test results."
    )
    print(f"best epoch {best.epoch}: val accuracy {best.val_accuracy:.4f}; wrote {target.folder}")
