"""One training recipe for both training stages: a network builder plus a list of phases.

`stages/train.py` and `stages/transfer.py` say which network to build and how each phase
optimises it. Everything else is here: the data they fit on (the augmented train split, the
untouched val split), the MLflow run and its upstream runs, the checkpoint and its key, the
trainer, and what a finished fit publishes (model folder, history, metrics, the logged model).

A private phase (`Phase.privacy`) trains with DP-SGD (privacy.py) the way the model table says
(`models.ModelSpec.private`): the whole network in the trainer, on the un-augmented train split,
or a linear head on the frozen backbone's features of every augmented view.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cnnpipe import engine, layout, models, networks, plots, serving, store, tracking, trial
from cnnpipe.engine import EpochRecord, Trainer
from cnnpipe.params import Params, PrivacyParams, TrainingParams
from cnnpipe.store import Split


@dataclass(frozen=True)
class Phase:
    """Consecutive epochs trained with one optimiser and one learning-rate schedule."""

    name: str
    epochs: int
    # Makes the optimiser for the network; it also decides which parameters learn.
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    # Makes the schedule for that optimiser, stepped once per batch, over the phase's steps;
    # None: a constant learning rate.
    schedule: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] | None
    # DP-SGD for these epochs (a private recipe is this one phase), or None.
    privacy: PrivacyParams | None = None


@dataclass(frozen=True)
class Recipe:
    target: layout.TrainedModel
    settings: TrainingParams
    build: Callable[[int], nn.Module]  # number of classes -> a freshly initialised network
    phases: list[Phase]
    meta: dict = field(default_factory=dict)  # more model-folder facts, e.g. input_size

    @property
    def privacy(self) -> PrivacyParams | None:
        return self.phases[0].privacy

    @property
    def private_part(self) -> str | None:
        """What DP-SGD trains, by the model table (whole | head), or None: not private."""
        return models.MODELS[self.settings.model].private if self.privacy else None


@dataclass
class Job:
    """What a fit works with."""

    recipe: Recipe
    model: nn.Module  # freshly built
    train: Split
    val: Split
    norm: engine.Normalisation
    runtime: engine.Runtime
    seed: int
    checkpoint: engine.Checkpoint
    mlrun: tracking.StageRun


@dataclass
class Fitted:
    """What a fit publishes."""

    model: nn.Module  # the best epoch's weights, in eval mode
    history: list[EpochRecord]
    train_images: int  # the images it learnt from (an augmented copy is another image)
    privacy: store.PrivacySpent | None = None  # a private fit: the ε it spent, at δ
    pruned_at: int | None = None  # a pruned trial of `cnnpipe tune`: the epoch it stopped after


def fit_data(recipe: Recipe) -> tuple[Split, Split, list[str]]:
    """Train on the augmented train split, choose the best epoch on the untouched val split.
    DP-SGD on the whole network trains on the un-augmented train split: each image one record
    (an augmented copy counted as another record would halve the guarantee for its image)."""
    source = layout.PREPARED if recipe.private_part == "whole" else layout.AUGMENTED
    train = store.read_split(source, "train")
    val = store.read_split(layout.PREPARED, "val")
    return train, val, store.read_classes(layout.PREPARED)


def checkpoint(recipe: Recipe, logged_params: dict, fingerprints: dict) -> engine.Checkpoint:
    """The stage's checkpoint, keyed by every param the stage reads and its input data."""
    key = json.dumps([logged_params, fingerprints], sort_keys=True, default=str)
    return engine.Checkpoint(recipe.target.checkpoint, hashlib.sha256(key.encode()).hexdigest())


def epoch_logger(mlrun, private=None, report=None) -> Callable[[EpochRecord, float], bool]:
    """Logs each epoch to the stage's run; with `private` (a `privacy.PrivateFit`), the ε spent
    so far too, also printed. With `report` (`trial.epoch_reporter`), reports the epoch's val
    score to the trial of `cnnpipe tune` and answers True when the trial is pruned."""

    def log(record: EpochRecord, images_per_second: float) -> bool:
        spent = {"epsilon": private.epsilon()} if private is not None else {}
        if spent:
            print(f"epoch {record.epoch}: ε spent {spent['epsilon']:.2f}", file=sys.stderr)
        mlrun.log_epoch(vars(record) | spent, images_per_second)
        return report is not None and report(record.epoch, getattr(record, report.metric))

    return log


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
        train, val, classes = fit_data(recipe)
        mlrun.log_splits(
            {"train": train, "val": val}, classes, fingerprints["prepare"], params.data.source
        )
        engine.make_deterministic(params.seed, settings.deterministic, runtime.device)
        model = recipe.build(len(classes))
        mean, std = networks.normalisation(settings.model)
        job = Job(
            recipe,
            model,
            train,
            val,
            engine.Normalisation(mean, std),
            runtime,
            params.seed,
            checkpoint(recipe, logged, fingerprints),
            mlrun,
        )
        fitted = fit_head(job) if recipe.private_part == "head" else fit_phases(job)
        if runtime.is_main:
            meta = store.ModelMeta(
                architecture=settings.model,
                classes=classes,
                image_size=params.data.image_size,
                mean=mean,
                std=std,
                best_epoch=engine.best_epoch(fitted.history).epoch,
                privacy=fitted.privacy,
                **recipe.meta,
            )
            publish(fitted, recipe.target, meta, mlrun)
    engine.stop_runtime(runtime)


def fit_phases(job: Job) -> Fitted:
    """Train the network phase by phase in the trainer; a private phase with DP-SGD."""
    phases = job.recipe.phases
    trainer = Trainer(
        job.model,
        job.train,
        job.val,
        job.norm,
        job.runtime,
        job.recipe.settings.batch_size,
        job.seed,
        sum(phase.epochs for phase in phases),
        job.checkpoint,
    )
    until, private = 0, None
    report = trial.epoch_reporter(job.recipe.target.stage)
    for phase in phases:
        if trainer.stopped_at is not None:
            break
        until += phase.epochs
        # A phase the checkpoint has finished needs no optimiser (the first one built imports
        # torch._dynamo: seconds); a private one is resumed all the same, for the ε it spent.
        if not phase.epochs or (len(trainer.history) >= until and not phase.privacy):
            continue
        optimizer = phase.optimizer(job.model)
        if phase.privacy:
            dp = _privacy()
            private = dp.make_private(
                job.model,
                optimizer,
                train_size=len(job.train),
                privacy=phase.privacy,
                seed=job.seed,
            )
        steps = private.steps_per_epoch if private else trainer.steps_per_epoch()
        schedule = phase.schedule(optimizer, phase.epochs * steps) if phase.schedule else None
        trainer.on_epoch = epoch_logger(job.mlrun, private, report)
        trainer.run(optimizer, until, schedule, phase=phase.name, private=private)
    spent = store.PrivacySpent(epsilon=private.epsilon(), delta=private.delta) if private else None
    if trainer.stopped_at is not None:
        print(f"trial pruned after epoch {trainer.stopped_at}", file=sys.stderr)
    return Fitted(trainer.best_model(), trainer.history, len(job.train), spent, trainer.stopped_at)


def _privacy():
    """privacy.py, imported when a fit is private: Opacus takes seconds to import."""
    from cnnpipe import privacy

    return privacy


def fit_head(job: Job) -> Fitted:
    """DP-SGD on a new linear head over the frozen backbone's features, computed once: for
    each train image, its augmented copies are its views (`privacy.by_image`)."""
    dp = _privacy()
    model, device = job.model, job.runtime.device
    images = len(store.read_split(layout.PREPARED, "train"))
    features = dp.head_features(model, job.train.images, job.norm, device)
    train = (dp.by_image(features, len(job.train) // images), job.train.labels[:images])
    val = (dp.head_features(model, job.val.images, job.norm, device), job.val.labels)
    (phase,) = job.recipe.phases
    head = model.head.cpu()
    optimizer = phase.optimizer(head)
    private = dp.make_private(
        head, optimizer, train_size=images, privacy=phase.privacy, seed=job.seed
    )
    schedule = phase.schedule(optimizer, phase.epochs * private.steps_per_epoch)
    history = dp.fit_head(
        private,
        optimizer,
        schedule,
        train,
        val,
        phase.epochs,
        job.checkpoint,
        epoch_logger(job.mlrun, private),
    )
    spent = store.PrivacySpent(epsilon=private.epsilon(), delta=private.delta)
    return Fitted(model.cpu().eval(), history, len(job.train), spent)


def publish(fitted: Fitted, target: layout.TrainedModel, meta: store.ModelMeta, mlrun) -> None:
    """Write the best epoch's model folder, the history (a DVC plot) and the metrics, and log
    them with the model to the stage's MLflow run."""
    best = engine.best_epoch(fitted.history)
    store.write_model_folder(target.folder, fitted.model.cpu().state_dict(), meta)
    rows = engine.history_rows(fitted.history)
    store.write_csv(target.history, rows)
    best_metrics = {f"best_{k}": v for k, v in vars(best).items()}
    spent = fitted.privacy.model_dump() if fitted.privacy else {}
    pruned = {trial.PRUNED_KEY: fitted.pruned_at} if fitted.pruned_at is not None else {}
    store.write_json_atomic(target.metrics, best_metrics | spent | pruned)

    mlrun.set_fingerprint(store.fingerprint(target.folder))
    mlrun.log_metrics(best_metrics | pruned | {k: v for k, v in spent.items() if k != "epsilon"})
    if fitted.privacy:  # at the last epoch, where the per-epoch values end (a resumed run too)
        mlrun.log_metrics({"epsilon": fitted.privacy.epsilon}, step=len(fitted.history))
    figure = plots.learning_curves(rows, f"{target.name} ({meta.architecture})")
    mlrun.log_figure(figure, "learning_curves.png")
    plots.close(figure)
    examples = np.array(store.read_split(layout.PREPARED, "val").images[:4])
    mlrun.log_model(lambda: serving.log_model(target, examples))
    guarantee = (
        f"; differentially private, ε = {fitted.privacy.epsilon:.2f} at δ = "
        f"{fitted.privacy.delta:.2g}"
        if fitted.privacy
        else ""
    )
    if pruned:
        guarantee += f"; a trial of `cnnpipe tune`, pruned after epoch {fitted.pruned_at}"
    mlrun.describe(
        f"The **{target.name}** model: `{meta.architecture}`, {len(fitted.history)} epochs "
        f"on {fitted.train_images} training images{guarantee}; best val accuracy "
        f"{best.val_accuracy:.4f} at epoch {best.epoch}. Written to `{target.folder}`, logged "
        f"as `{serving.logged_name(target, meta)}`; evaluate adds its test results."
    )
    print(f"best epoch {best.epoch}: val accuracy {best.val_accuracy:.4f}; wrote {target.folder}")
