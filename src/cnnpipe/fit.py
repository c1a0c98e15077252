"""One recipe for both training stages: a network builder plus a list of phases, trained in the
one loop (`engine.Trainer`).

`stages/train.py` and `stages/transfer.py` say which network to build and how each phase
optimises it. Everything else is here: the data they fit on (the train split of
`data/augmented`, drawn through its augmentation policy; the untouched val split), the loop's
options from the stage's params (`loop_options`), the checkpoint and its key, and what a
finished fit publishes (model folder, history, metrics) and records.

A private phase (`Phase.privacy`) trains with DP-SGD (privacy.py) the way the model table says
(`models.ModelSpec.private`): the whole network on the original train images, or a linear
head on the frozen backbone's features of each image's views.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from cnnpipe import engine, layout, models, networks, rules, runtime, store, trial
from cnnpipe.engine import EpochRecord, LoopOptions, Trainer
from cnnpipe.errors import UserError
from cnnpipe.params import FitParams, Params, PrivacyParams
from cnnpipe.recorder import Recorder

# The learning rate a warm-up starts from, as a share of the phase's own.
WARMUP_START = 0.1


@dataclass(frozen=True)
class Phase:
    """Consecutive epochs trained with one optimiser and one learning-rate schedule: a linear
    warm-up over `warmup_epochs`, then cosine decay to zero (`decay`) or constant."""

    name: str
    epochs: int
    # Makes the optimiser for the network; it also decides which parameters learn.
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    warmup_epochs: int = 0
    decay: bool = True
    # DP-SGD for these epochs (a private recipe is this one phase), or None.
    privacy: PrivacyParams | None = None

    def schedule(self, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Stepped once per batch."""
        sched = torch.optim.lr_scheduler
        warmup = min(self.warmup_epochs, self.epochs - 1) * steps_per_epoch
        rest = max(1, self.epochs * steps_per_epoch - warmup)
        after = (
            sched.CosineAnnealingLR(optimizer, rest)
            if self.decay
            else sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
        )
        if not warmup:
            return after
        start = sched.LinearLR(optimizer, WARMUP_START, total_iters=warmup)
        return sched.SequentialLR(optimizer, [start, after], milestones=[warmup])


@dataclass(frozen=True)
class Recipe:
    target: layout.TrainedModel
    settings: FitParams
    build: Callable[[int], nn.Module]  # number of classes -> a freshly initialised network
    phases: list[Phase]
    meta: dict = field(default_factory=dict)  # more model-folder facts, e.g. input_size
    size_param: str = "data.image_size"  # the param that sets the size the network sees

    @property
    def privacy(self) -> PrivacyParams | None:
        return self.phases[0].privacy

    @property
    def private_part(self) -> str | None:
        """What DP-SGD trains, by the model table (whole | head), or None: not private."""
        return models.MODELS[self.settings.model].private if self.privacy else None


@dataclass
class Fitted:
    """What a fit publishes."""

    model: nn.Module  # the best epoch's weights, in eval mode
    history: list[EpochRecord]
    score: str  # the val score that chose the best epoch
    train_images: int  # the images it learnt from
    stopped: str | None = None  # why it stopped before its last epoch
    privacy: store.PrivacySpent | None = None  # a private fit: the ε it spent, at δ
    pruned_at: int | None = None  # a pruned trial of `cnnpipe tune`: the epoch it stopped after

    @property
    def best(self) -> EpochRecord:
        return engine.best_epoch(self.history, self.score)


@dataclass(frozen=True)
class FitData:
    """The splits a fit reads: train (with its augmentation), val, and the class names."""

    train: store.Split
    val: store.Split
    classes: list[str]
    augmentation: store.Augmentation


def read_fit_data(recipe: Recipe) -> FitData:
    """Train on `data/augmented`'s train split, choose the best epoch on the untouched val
    split. DP-SGD on the whole network trains on the original images only: each image one
    record (an offline augmented copy counted as another record would halve the guarantee for
    its image)."""
    augmentation = store.read_augmentation(layout.AUGMENTATION)
    train = store.read_split(layout.AUGMENTED, "train")
    if recipe.private_part == "whole":
        train = augmentation.originals_of(train)
    val = store.read_split(layout.PREPARED, "val")
    return FitData(train, val, store.read_classes(layout.PREPARED), augmentation)


def loop_options(settings: FitParams, data: FitData, device, private: bool) -> LoopOptions:
    """The loop's options from the stage's params, `auto` resolved by `rules`; what DP-SGD
    excludes (privacy.py) left out when `private`."""
    classes, labels = len(data.classes), data.train.labels
    imbalanced = rules.imbalanced(labels, classes)
    weighted = settings.class_weights == "balanced" or (
        settings.class_weights == "auto" and imbalanced
    )
    weights = None
    if weighted and not private:
        weights = torch.tensor(rules.balanced_class_weights(labels, classes), dtype=torch.float32)
    spec = models.MODELS[settings.model]
    return LoopOptions(
        batch_size=settings.batch_size,
        objective=engine.Objective(settings.label_smoothing, weights),
        mixing=None if private else mixing(settings.mixup, settings.cutmix, classes),
        ema_decay=settings.ema_decay,
        patience=settings.patience,
        score="balanced_accuracy" if imbalanced else "accuracy",
        precision=runtime.precision(settings.precision, device, spec.fast_in_bf16_on_cpu),
    )


def mixing(mixup: float, cutmix: float, classes: int) -> Callable | None:
    """torchvision's MixUp and CutMix (each batch one of them, by chance) at these Beta alphas;
    None when both are 0."""
    if not (mixup or cutmix):
        return None
    from torchvision.transforms import v2

    units = max(classes, 2)
    chosen = [v2.MixUp(alpha=mixup, num_classes=units)] if mixup else []
    chosen += [v2.CutMix(alpha=cutmix, num_classes=units)] if cutmix else []
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def checkpoint(recipe: Recipe, logged_params: dict, fingerprints: dict) -> engine.Checkpoint:
    """The stage's checkpoint, keyed by every param the stage reads and its input data."""
    key = json.dumps([logged_params, fingerprints], sort_keys=True, default=str)
    return engine.Checkpoint(recipe.target.checkpoint, hashlib.sha256(key.encode()).hexdigest())


def epoch_logger(
    recorder: Recorder, private=None, report=None
) -> Callable[[EpochRecord, float], bool]:
    """Logs each epoch to the stage's run; with `private` (a `privacy.PrivateFit`), the ε spent
    so far too, also printed. With `report` (`trial.epoch_reporter`), reports the epoch's val
    score to the trial of `cnnpipe tune` and answers True when the trial is pruned."""

    def log(record: EpochRecord, images_per_second: float) -> bool:
        spent = {"epsilon": private.epsilon()} if private is not None else {}
        if spent:
            print(f"epoch {record.epoch}: ε spent {spent['epsilon']:.2f}", file=sys.stderr)
        recorder.log_epoch(vars(record) | spent, images_per_second)
        return report is not None and report(record.epoch, getattr(record, report.metric))

    return log


def run(recipe: Recipe, params: Params, recorder: Recorder) -> None:
    """Fit `recipe` phase by phase (resuming from a checkpoint), then publish the best epoch."""
    stage, settings = recipe.target.stage, recipe.settings
    fingerprints = {
        "prepare": store.fingerprint(layout.PREPARED),
        "augment": store.fingerprint(layout.AUGMENTED),
    }
    where = runtime.start_runtime(settings.device)
    data = read_fit_data(recipe)
    recorder.log_splits(
        {"train": data.train, "val": data.val},
        data.classes,
        fingerprints["prepare"],
        params.data.source,
    )
    runtime.make_deterministic(params.seed, settings.deterministic, where.device)
    model = recipe.build(len(data.classes))
    norm = engine.Normalisation(*networks.normalisation(settings.model))
    options = loop_options(settings, data, where.device, recipe.privacy is not None)
    job = FitContext(
        recipe,
        model,
        data,
        norm,
        options,
        where,
        params.seed,
        checkpoint(recipe, layout.stage_params(stage, params), fingerprints),
        recorder,
        trial.epoch_reporter(stage),
    )
    fitted = fit_head(job) if recipe.private_part == "head" else fit_network(job)
    if where.is_main:
        meta = store.ModelMeta(
            architecture=settings.model,
            classes=data.classes,
            image_size=data.train.images.shape[1],
            mean=norm.mean,
            std=norm.std,
            best_epoch=fitted.best.epoch,
            privacy=fitted.privacy,
            pruned_at_epoch=fitted.pruned_at,
            precision=options.precision,
            resize=params.data.resize,
            **recipe.meta,
        )
        publish(fitted, recipe.target, meta, runtime.host_record(where.device), recorder)
    runtime.stop_runtime(where)


@dataclass
class FitContext:
    """What a fit works with."""

    recipe: Recipe
    model: nn.Module  # freshly built
    data: FitData
    norm: engine.Normalisation
    options: LoopOptions
    where: runtime.Runtime
    seed: int
    checkpoint: engine.Checkpoint
    recorder: Recorder
    report: Callable[[int, float], bool] | None  # the trial's, when this fit is one


def fit_network(job: FitContext) -> Fitted:
    """Train the network phase by phase; a private phase with DP-SGD."""
    augmentation, phases, private = job.data.augmentation, job.recipe.phases, None
    policy = augmentation.policy() if augmentation.on_the_fly else None
    splits = (job.data.train, job.data.val)
    train, val = engine.image_inputs(splits, job.norm, job.where.device, policy, job.seed)
    epochs = sum(phase.epochs for phase in phases)
    trainer = Trainer(
        job.model, train, val, job.where, job.options, job.seed, epochs, job.checkpoint
    )
    ends = list(itertools.accumulate(phase.epochs for phase in phases))
    # A phase the checkpoint has finished needs no optimiser (the first one built imports
    # torch._dynamo: seconds); a private one is resumed all the same, for the ε it spent.
    left = [len(trainer.history) < end and not trainer.stopped for end in ends]
    require_memory(job, trainer, [phase for phase, todo in zip(phases, left, strict=True) if todo])
    for number, (phase, until, todo) in enumerate(zip(phases, ends, left, strict=True), 1):
        if not phase.epochs or not (todo or phase.privacy):
            continue
        optimizer = phase.optimizer(job.model)
        if phase.privacy:
            private = _make_private(job.model, optimizer, len(train), phase, job.seed)
        steps = private.steps_per_epoch if private else trainer.steps_per_epoch()
        trainer.on_epoch = epoch_logger(job.recorder, private, job.report)
        last = number == len(phases)
        trainer.run(optimizer, until, phase.schedule(optimizer, steps), phase.name, private, last)
    spent = store.PrivacySpent(epsilon=private.epsilon(), delta=private.delta) if private else None
    return result_of(trainer, job, len(train), spent)


def require_memory(job: FitContext, trainer: Trainer, phases: list[Phase]) -> None:
    """Refuse in one line, before the first of `phases` starts, a fit whose training step in
    any of them cannot fit in memory (naming the phase that needs most per image).

    A step needs what `engine.step_bytes_per_image` measures per image (with the weights that
    phase's optimiser trains) times the batch, plus DP-SGD's per-image gradients; a step that
    needs more than the memory left (by `engine.MEMORY_MARGIN`) cannot run: on the CPU the
    kernel would kill the stage with no message (transfer at 512 px in batches of 4,096 was, in
    its frozen phase). With fewer than 4 images a step, nothing is measured."""
    available = runtime.available_memory(job.where)
    if available is None:
        return
    too_large = []
    for phase in phases:
        batch = trainer.images_per_step(phase.privacy.batch_size if phase.privacy else None)
        if batch < 4 or not phase.epochs:
            continue
        phase.optimizer(job.model)  # it decides which weights learn
        per_image = engine.step_bytes_per_image(job.model, trainer.train, job.options.precision)
        if phase.privacy:  # Opacus keeps every image's gradient of every weight that learns
            learning = [weight for weight in job.model.parameters() if weight.requires_grad]
            per_image += sum(weight.numel() * weight.element_size() for weight in learning)
        if batch * per_image > available * engine.MEMORY_MARGIN:
            too_large.append(StepNeed(per_image, batch, phase.name, phase.privacy is not None))
    if too_large:
        raise UserError(_too_large(job, max(too_large), available))


class StepNeed(NamedTuple):
    """What a training step of a phase needs; ordered by `per_image`, the largest first."""

    per_image: int  # bytes
    batch: int  # images
    phase: str
    private: bool


def _too_large(job: FitContext, need: StepNeed, available: int) -> str:
    stage = job.recipe.target.stage
    size = getattr(job.model, "input_size", job.data.train.images.shape[1])
    batch_param = f"{stage}.privacy.batch_size" if need.private else f"{stage}.batch_size"
    holder = runtime.memory_holder(job.where.device)
    return (
        f"a training step of {need.batch:,} images at {size} px in the {need.phase} phase needs "
        f"about {need.batch * need.per_image / 2**30:,.1f} GiB of memory, and {holder} has "
        f"{available / 2**30:,.1f} GiB free: lower {batch_param} well below "
        f"{available // need.per_image:,}, or {job.recipe.size_param}"
    )


def _make_private(model: nn.Module, optimizer, train_size: int, phase: Phase, seed: int):
    """privacy.py is imported only for a private fit: Opacus takes seconds to import."""
    from cnnpipe import privacy

    return privacy.make_private(
        model, optimizer, train_size=train_size, privacy=phase.privacy, seed=seed
    )


def fit_head(job: FitContext) -> Fitted:
    """DP-SGD on a new linear head over the frozen backbone's features, computed once for each
    train image's views (the original and its offline augmented copies, `Augmentation`)."""
    from cnnpipe import privacy

    model, device = job.model, job.where.device
    train_rows = privacy.head_features(model, job.data.train.images, job.norm, device)
    features = job.data.augmentation.views_by_image(train_rows)
    labels = job.data.augmentation.originals_of(job.data.train).labels
    val = engine.FeatureInputs(
        privacy.head_features(model, job.data.val.images, job.norm, device), job.data.val.labels
    )
    head = privacy.CenteredHead(model.head.cpu(), val.features.mean(dim=0))
    train = engine.FeatureInputs(features, labels)
    (phase,) = job.recipe.phases
    cpu = runtime.Runtime(torch.device("cpu"))
    trainer = Trainer(head, train, val, cpu, job.options, job.seed, phase.epochs, job.checkpoint)
    optimizer = phase.optimizer(head)
    private = _make_private(head, optimizer, len(train), phase, job.seed)
    trainer.on_epoch = epoch_logger(job.recorder, private, job.report)
    schedule = phase.schedule(optimizer, private.steps_per_epoch)
    trainer.run(optimizer, phase.epochs, schedule, phase.name, private)
    trainer.best_model().folded()
    spent = store.PrivacySpent(epsilon=private.epsilon(), delta=private.delta)
    return result_of(trainer, job, len(train), spent, model.cpu().eval())


def result_of(trainer: Trainer, job: FitContext, train_images: int, spent, model=None) -> Fitted:
    """What `trainer` learnt: `model` (default: its best epoch's weights) and its history."""
    return Fitted(
        model if model is not None else trainer.best_model(),
        trainer.history,
        job.options.score,
        train_images,
        trainer.stopped,
        spent,
        trainer.pruned_at,
    )


def publish(
    fitted: Fitted, target: layout.TrainedModel, meta: store.ModelMeta, host: dict, recorder
) -> None:
    """Write the best epoch's model folder, the history (a DVC plot), the metrics and the host
    that trained it, and record them with the model in the stage's MLflow run."""
    best = fitted.best
    store.write_model_folder(target.folder, fitted.model.cpu().state_dict(), meta)
    rows = engine.history_rows(fitted.history)
    store.write_csv(target.history, rows)
    store.write_json_atomic(target.host, host)
    recorder.log_dict(host, target.host.name)
    best_metrics = {f"best_{k}": v for k, v in vars(best).items()}
    spent = fitted.privacy.model_dump() if fitted.privacy else {}
    pruned = {trial.PRUNED_KEY: fitted.pruned_at} if fitted.pruned_at is not None else {}
    store.write_json_atomic(target.metrics, best_metrics | spent | pruned)

    recorder.log_metrics(best_metrics | pruned | {k: v for k, v in spent.items() if k != "epsilon"})
    if fitted.privacy:  # at the last epoch, where the per-epoch values end (a resumed run too)
        recorder.log_metrics({"epsilon": fitted.privacy.epsilon}, step=len(fitted.history))
    recorder.log_learning_curves(rows, f"{target.name} ({meta.architecture})")
    examples = np.array(store.read_split(layout.PREPARED, "val").images[:4])
    recorder.log_model(target, examples)
    recorder.describe(_description(fitted, target, meta))
    print(
        f"best epoch {best.epoch}: val {fitted.score.replace('_', ' ')} "
        f"{getattr(best, engine.SCORES[fitted.score]):.4f}; wrote {target.folder}"
    )


def _description(fitted: Fitted, target: layout.TrainedModel, meta: store.ModelMeta) -> str:
    best = fitted.best
    guarantee = (
        f"; differentially private, ε = {fitted.privacy.epsilon:.2f} at δ = "
        f"{fitted.privacy.delta:.2g}"
        if fitted.privacy
        else ""
    )
    stopped = f" ({fitted.stopped})" if fitted.stopped else ""
    return (
        f"The **{target.name}** model: `{meta.architecture}` at {meta.image_size} px in "
        f"{meta.precision}, {len(fitted.history)} epochs{stopped} on {fitted.train_images} "
        f"training images{guarantee}; best val {fitted.score.replace('_', ' ')} "
        f"{getattr(best, engine.SCORES[fitted.score]):.4f} at epoch {best.epoch}. Written to "
        f"`{target.folder}`; evaluate adds its test results."
    )
