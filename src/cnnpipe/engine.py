"""The one training loop, and prediction, for every model the pipeline trains.

Images stay uint8 arrays (memory-mapped) and become float tensors one batch at a time: drawn
through the augmentation policy (fresh views every epoch, from a generator seeded by the epoch,
so reruns and resumed runs see the same ones), scaled to [0, 1], normalised, channels_last.
Precomputed features (a private head, privacy.py) go through the same loop.

Options of the loop, each off by default: label smoothing and class weights (`Objective`),
mixup / cutmix (`Mixing`), an exponential moving average of the weights (timm's `ModelEmaV3`:
the average is what is validated and kept), early stopping after `patience` epochs without a
better val score, DP-SGD (`PrivateSteps`), bf16 autocast. One checkpoint format, one resume
path, one rule for the best epoch (`best_epoch`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from cnnpipe import networks, store
from cnnpipe.runtime import Runtime, autocast
from cnnpipe.store import Split

# The val scores the best epoch can be chosen by (the `EpochRecord` fields behind them).
SCORES = {"accuracy": "val_accuracy", "balanced_accuracy": "val_balanced_accuracy"}


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_balanced_accuracy: float


def best_epoch(history: list[EpochRecord], score: str = "accuracy") -> EpochRecord:
    """The epoch whose weights a fit keeps: best val `score`, then val loss, then the
    earliest."""
    field_name = SCORES[score]
    return max(history, key=lambda r: (getattr(r, field_name), -r.val_loss, -r.epoch))


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """The mean of the per-class recalls (classes present in `labels`)."""
    recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


class PrivateSteps(Protocol):
    """DP-SGD around a trainer's model and optimiser (`privacy.PrivateFit`)."""

    model: nn.Module  # the model, wrapped to compute per-image gradients
    optimizer: torch.optim.Optimizer  # the optimiser, wrapped to clip them and add noise

    def batches(self) -> Iterator[np.ndarray]: ...  # one epoch of Poisson index batches

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, ...]
    std: tuple[float, ...]


@functools.lru_cache(maxsize=8)
def _scale_and_shift(norm: Normalisation, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x / 255 - mean) / std as one multiply and one subtract per pixel."""
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    return 1 / (255 * std), mean / std


def to_input(batch: np.ndarray, norm: Normalisation, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W in channels_last memory layout
    (the NHWC bytes seen as NCHW are channels_last already). The uint8 batch is copied to the
    device (pinned, asynchronously on CUDA) before the conversion: 4x fewer bytes than float."""
    if not (batch.flags.writeable and batch.flags.c_contiguous):
        batch = np.array(batch, order="C")
    pixels = torch.from_numpy(batch)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    pixels = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
    scale, shift = _scale_and_shift(norm, device)
    return pixels.float().mul_(scale).sub_(shift)


class Inputs(Protocol):
    """What the loop trains or validates on: labels, and the model's input for index batches."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def batch(self, index: np.ndarray, epoch: int | None = None) -> torch.Tensor:
        """The inputs of rows `index`; with `epoch`, as trained on in that epoch (augmented)."""
        ...


@dataclass
class ImageInputs:
    """uint8 images; with a `policy` (albumentations), each image is drawn through it when
    trained on, from a generator seeded by `seed` and the epoch."""

    images: np.ndarray  # N x H x W x 3 uint8, possibly memory-mapped
    labels: np.ndarray
    norm: Normalisation
    device: torch.device
    policy: Callable | None = None  # an albumentations Compose
    seed: int = 0
    _epoch: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray, epoch: int | None = None) -> torch.Tensor:
        pixels = self.images[index]
        if epoch is not None and self.policy is not None:
            if epoch != self._epoch:
                self.policy.set_random_seed(self.seed * 100_003 + epoch)
                self._epoch = epoch
            pixels = np.stack([self.policy(image=image)["image"] for image in pixels])
        return to_input(pixels, self.norm, self.device)


def image_inputs(
    splits: tuple[Split, Split],
    norm: Normalisation,
    device: torch.device,
    policy: Callable | None = None,
    seed: int = 0,
) -> tuple[ImageInputs, ImageInputs]:
    """A trainer's inputs from (train, val) image splits, train images drawn through `policy`."""
    train, val = splits
    return (
        ImageInputs(train.images, train.labels, norm, device, policy, seed),
        ImageInputs(val.images, val.labels, norm, device),
    )


@dataclass
class FeatureInputs:
    """Precomputed features: N x features, or N x views x features (views of one image)."""

    features: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray, epoch: int | None = None) -> torch.Tensor:
        return self.features[torch.from_numpy(index)]


def batch_indices(
    size: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Index batches over `size` items, shuffled when a generator is given. With several
    processes each takes every world_size-th item of the same permutation (all shards of equal
    length, so every rank runs the same number of steps). Sorted within a batch so
    memory-mapped reads stay sequential. A shuffled (training) pass never ends on a batch of
    one image, which batch norm cannot normalise: that image joins the batch before."""
    order = torch.randperm(size, generator=generator) if generator else torch.arange(size)
    shard = order[: size - size % world_size][rank::world_size]
    starts = list(range(0, len(shard), batch_size))
    if generator is not None and len(starts) > 1 and len(shard) - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(shard)
        yield np.sort(shard[start:end].numpy())


@torch.no_grad()
def logits_of(model: nn.Module, inputs: Inputs, batch_size: int = 256) -> torch.Tensor:
    """The model's logits (float, on the CPU) for every row of `inputs`, in eval mode."""
    model.eval()
    outputs = [
        model(inputs.batch(index)).float().cpu() for index in batch_indices(len(inputs), batch_size)
    ]
    return torch.cat(outputs)


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    labels = np.zeros(len(images), dtype=np.int64)
    return logits_of(model, ImageInputs(images, labels, norm, device), batch_size)


def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    return networks.probabilities(predict_logits(model, images, norm, device, batch_size)).numpy()


# `step_bytes_per_image` is within a few percent of what a real step adds to a process's peak
# memory per image (bench/memory_check.py): a batch is refused only when it needs more than
# this share of the memory left, so that no batch that could run is refused.
MEMORY_MARGIN = 1.1


def step_bytes_per_image(
    model: nn.Module, inputs: Inputs, precision: str = "fp32", training: bool = True
) -> int:
    """The memory a step of `model` takes for each image of its batch: the peak of the tensors
    alive during a training step's forward and backward pass (or, not `training`, a forward
    pass in eval mode), measured on steps of 2 and of 4 images of `inputs` (at least 4) and
    taken as the difference, so the weights and their gradients drop out. A step of n images
    needs n times this on top of the model. The model's mode, gradients, batch-norm statistics
    and the random streams are left as they were."""
    two, four = (_step_peak(model, inputs.batch(np.arange(n)), precision, training) for n in (2, 4))
    return max(0, (four - two) // 2)


# The memory a forward pass over one batch may take where the pipeline picks the batch itself
# (a served model's requests, a private head's features): at most 256 images, fewer where each
# takes more than 4 MiB (a transfer model at 512 px: about 70 MiB an image, 14 a batch).
BATCH_MEMORY = 1 << 30


def inference_bytes_per_image(
    model: nn.Module, norm: Normalisation, image_size: int, device: torch.device
) -> int:
    """`step_bytes_per_image` of a forward pass in eval mode on images of `image_size` (blank:
    the memory depends on their shape, not on what they show)."""
    blank = np.zeros((4, image_size, image_size, 3), np.uint8)
    inputs = ImageInputs(blank, np.zeros(4, np.int64), norm, device)
    return step_bytes_per_image(model, inputs, training=False)


def inference_batch_size(
    model: nn.Module, norm: Normalisation, image_size: int, device: torch.device
) -> int:
    """The images a forward pass of `model` in eval mode takes at a time: as many as
    `BATCH_MEMORY` holds, at most 256."""
    per_image = inference_bytes_per_image(model, norm, image_size, device)
    return int(np.clip(BATCH_MEMORY // max(per_image, 1), 1, 256))


def _step_peak(model: nn.Module, batch: torch.Tensor, precision: str, training: bool) -> int:
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training, grads = model.training, [(p, p.grad) for p in model.parameters()]
    rngs = [batch.device] if batch.device.type == "cuda" else []
    with torch.random.fork_rng(rngs), PeakMemory() as memory:
        model.train(training)
        with autocast(batch.device, precision), torch.set_grad_enabled(training):
            logits = torch.func.functional_call(model, buffers, (batch,), strict=False)
        if logits.requires_grad:  # a stand-in loss: its backward pass is that of any loss
            logits.float().logsumexp(1).sum().backward()
        del logits
    model.train(was_training)
    for weight, grad in grads:
        weight.grad = grad
    return memory.peak


class PeakMemory(TorchDispatchMode):
    """The peak bytes of the tensors that the operations run under it make and keep alive."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, int] = {}  # a storage's address -> its bytes
        self.total = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        self.peak = max(self.peak, self.total)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        address = storage.data_ptr()
        if address and address not in self.alive:  # a view or an in-place result: counted
            self.alive[address] = storage.nbytes()
            self.total += storage.nbytes()
            weakref.finalize(storage, self._freed, address)

    def _freed(self, address: int) -> None:
        self.total -= self.alive.pop(address, 0)


@dataclass
class Checkpoint:
    """The state after the last finished epoch, in one file that is replaced atomically.

    `key` names everything the run depends on (params, input data): a checkpoint written
    under another key is set aside instead of resumed from."""

    path: Path
    key: str

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.tmp")
        store.save_tensors(state | {"key": self.key}, staging)
        os.replace(staging, self.path)

    def load(self) -> dict | None:
        """The saved state, or None: none saved, or the file set aside with one line because
        it was written for other params or data, or is no checkpoint (empty, truncated, not a
        dict of tensors, a folder). Such a file would otherwise fail every rerun."""
        if not os.path.lexists(self.path):
            return None
        try:
            state = store.load_tensors(self.path)
        except Exception as err:  # EOFError, RuntimeError, UnpicklingError, IsADirectoryError...
            reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
            return self._set_aside(f"is not a readable checkpoint ({type(err).__name__} {reason})")
        if not isinstance(state, dict):
            return self._set_aside(f"holds a {type(state).__name__}, not a checkpoint")
        if state.get("key") != self.key:
            return self._set_aside("was written with other params or data")
        return state

    @property
    def set_aside_path(self) -> Path:
        """Beside the checkpoint's folder, not in it: the folder is a DVC output, whose
        recorded hash must not depend on what an earlier configuration left."""
        folder = self.path.parent
        return folder.with_name(f"{folder.name}.set-aside.pt")

    def _set_aside(self, why: str) -> None:
        set_aside = self.set_aside_path
        if set_aside.is_dir() and not set_aside.is_symlink():
            shutil.rmtree(set_aside)
        else:
            set_aside.unlink(missing_ok=True)
        os.replace(self.path, set_aside)
        print(
            f"checkpoint {self.path} {why}; set aside as {set_aside}, starting afresh",
            file=sys.stderr,
        )


def print_epoch(
    record: EpochRecord, total_epochs: int, images_per_second: float, seconds_left: float
) -> None:
    """The line a fit prints after each epoch (stderr), newline included in one write: print's
    separate write of the newline could be cut off by Ctrl-C, leaving "stopped" on its line."""
    sys.stderr.write(
        f"epoch {record.epoch}/{total_epochs}: train loss {record.train_loss:.4f} "
        f"acc {record.train_accuracy:.4f} | val loss {record.val_loss:.4f} "
        f"acc {record.val_accuracy:.4f} | {images_per_second:.0f} img/s "
        f"| ~{seconds_left:.0f}s left\n"
    )
    sys.stderr.flush()


def _progress(total: int, description: str) -> tqdm:
    """A redrawn bar with images/second and time left on a terminal; without one (CI, logs)
    the per-epoch line printed by the trainer is the progress report."""
    return tqdm(
        total=total, desc=description, unit="img", leave=False, disable=not sys.stderr.isatty()
    )


@dataclass(frozen=True)
class Objective:
    """The training loss: cross-entropy with optional label smoothing and class weights.
    Logits of N x views x classes (several views of each image) train on the mean over views,
    so each image counts once."""

    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = by_row(logits, targets)
        return networks.loss(
            logits,
            targets,
            label_smoothing=self.label_smoothing,
            class_weights=self.class_weights,
        )


def by_row(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of N x views x classes as (N * views) x classes, each image's target repeated."""
    if logits.dim() != 3:
        return logits, targets
    views = logits.shape[1]
    return logits.reshape(-1, logits.shape[-1]), targets.repeat_interleave(views, dim=0)


@dataclass(frozen=True)
class LoopOptions:
    """How the loop trains, besides the optimiser and schedule of each phase."""

    batch_size: int
    objective: Objective = Objective()
    # Mixes each batch's images and targets (torchvision's MixUp / CutMix): (x, y) -> (x, soft y)
    mixing: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    ema_decay: float = 0.0  # 0: no weight averaging
    patience: int = 0  # epochs without a better val score before stopping; 0: never
    score: str = "accuracy"  # the val score that picks the best epoch (SCORES)
    precision: str = "fp32"  # fp32 | bf16 (autocast)


@contextlib.contextmanager
def _quiet_hooks() -> Iterator[None]:
    """DP-SGD's per-image gradient hooks (Opacus) sit on the first layer too, whose input
    needs no gradient: torch warns so at every backward pass, and nothing is wrong."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        yield


def _go_on(record: EpochRecord, images_per_second: float) -> bool:
    return False


@dataclass
class Trainer:
    """Fits `model` on `train`, validates after every epoch on `val` (the weight average, with
    EMA), keeps the best epoch's weights, writes a checkpoint after every epoch and resumes
    from one. `on_epoch(record, images/s)` is called after each epoch; it returns True to stop
    the fit (a pruned search trial)."""

    model: nn.Module
    train: Inputs
    val: Inputs
    runtime: Runtime
    options: LoopOptions
    seed: int
    total_epochs: int
    checkpoint: Checkpoint | None = None
    on_epoch: Callable[[EpochRecord, float], bool] = _go_on
    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    stopped: str | None = None  # why the fit stopped before its last epoch
    pruned_at: int | None = None  # the epoch after which `on_epoch` stopped it
    steps: int = 0  # optimiser steps taken (the weight average warms up over them)

    def __post_init__(self) -> None:
        self.device = self.runtime.device
        self.model.to(self.device, memory_format=torch.channels_last)
        self.ema = self._weight_average() if self.options.ema_decay else None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.resumed = self.checkpoint.load() if self.checkpoint else None
        if self.resumed:
            self._restore(self.resumed)

    def _weight_average(self) -> nn.Module:
        from timm.utils import ModelEmaV3  # timm takes a second to import: only when asked

        return ModelEmaV3(self.model, decay=self.options.ema_decay, use_warmup=True)

    @property
    def validated(self) -> nn.Module:
        """The weights validated and kept: the average with EMA, else the model's own."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def best(self) -> EpochRecord:
        return best_epoch(self.history, self.options.score)

    def steps_per_epoch(self) -> int:
        """The batches `batch_indices` makes of this rank's shard in a training pass."""
        per_rank = len(self.train) // self.runtime.world_size
        batches = -(-per_rank // self._rank_batch_size())
        ends_on_one = batches > 1 and per_rank % self._rank_batch_size() == 1
        return max(1, batches - ends_on_one)

    def images_per_step(self, batch_size: int | None = None) -> int:
        """The most images a training step of this rank takes, in batches of `batch_size`
        (default: the loop's) over all ranks."""
        batch = (batch_size or self.options.batch_size) // self.runtime.world_size
        return min(max(1, batch), len(self.train) // self.runtime.world_size)

    def _rank_batch_size(self) -> int:
        return max(1, self.options.batch_size // self.runtime.world_size)

    def run(
        self,
        optimizer: torch.optim.Optimizer,
        until_epoch: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        phase: str = "fit",
        private: PrivateSteps | None = None,
        may_stop_early: bool = True,
    ) -> None:
        """Train up to epoch `until_epoch`, resuming the optimiser and schedule of a
        checkpoint written in the same `phase`. The scheduler, if any, steps every batch.
        With `private` (made around this model and `optimizer`), the epochs are DP-SGD: its
        Poisson batches, per-image gradients and noisy steps, its state in the checkpoint.
        `may_stop_early`: patience may end the fit in this phase."""
        if self.resumed and self.resumed["phase"] == phase:
            optimizer.load_state_dict(self.resumed["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(self.resumed["scheduler"])
            if private is not None:  # also when no epoch is left: it holds the ε spent
                private.load_state_dict(self.resumed["private"])
        net, stepper = self.model, optimizer
        if private is not None:
            net, stepper = private.model, private.optimizer
        elif self.runtime.world_size > 1:
            net = DistributedDataParallel(self.model, device_ids=self._device_ids())
        with _quiet_hooks() if private is not None else contextlib.nullcontext():
            for epoch in range(len(self.history) + 1, until_epoch + 1):
                if self.stopped:
                    return
                started = time.perf_counter()
                batches = private.batches() if private is not None else None
                train_loss, train_accuracy, speed = self.train_epoch(
                    net, stepper, scheduler, epoch, batches
                )
                record = self._validate(epoch, train_loss, train_accuracy)
                self._finish_epoch(record, speed, started, may_stop_early)
                if self.checkpoint and self.runtime.is_main:
                    state = self._state(optimizer, scheduler, phase)
                    if private is not None:
                        state["private"] = private.state_dict()
                    self.checkpoint.save(state)

    def _device_ids(self) -> list[int] | None:
        return [self.device.index] if self.device.type == "cuda" else None

    def train_epoch(
        self,
        net: nn.Module,
        optimizer,
        scheduler=None,
        epoch: int = 1,
        batches: Iterator[np.ndarray] | None = None,
    ) -> tuple[float, float, float]:
        """One pass over this rank's shard of the train split, or over `batches` (index
        arrays) when given: (loss, accuracy, images/s)."""
        net.train()
        started = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, count
        if batches is None:
            batches = batch_indices(
                len(self.train),
                self._rank_batch_size(),
                self.generator,
                self.runtime.rank,
                self.runtime.world_size,
            )
        with _progress(len(self.train) // self.runtime.world_size, f"epoch {epoch}") as bar:
            for index in batches:
                totals += self._step(net, optimizer, scheduler, index, epoch)
                bar.update(len(index))
        if self.runtime.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
        seconds = time.perf_counter() - started
        return loss_sum / max(count, 1), correct / max(count, 1), count / seconds

    def _step(self, net, optimizer, scheduler, index: np.ndarray, epoch: int) -> torch.Tensor:
        """One optimiser step on the rows `index`: (loss sum, correct, count) of the batch."""
        inputs = self.train.batch(index, epoch)
        targets = torch.from_numpy(self.train.labels[index]).to(self.device)
        trained_on = targets
        if self.options.mixing is not None and len(index) > 1:
            inputs, trained_on = self.options.mixing(inputs, targets)
        with autocast(self.device, self.options.precision):
            logits = net(inputs)
        batch_loss = self.options.objective(logits, trained_on)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.steps)
        if not len(index):  # an empty (Poisson) batch steps too, but has no loss to count
            return torch.zeros(3, dtype=torch.float64, device=self.device)
        flat, flat_targets = by_row(logits.detach(), targets)
        views = len(flat) // len(index)
        correct = (networks.predicted_classes(flat) == flat_targets).sum() / views
        count = torch.tensor(float(len(index)), dtype=torch.float64, device=self.device)
        return torch.stack([batch_loss.detach().double() * len(index), correct.double(), count])

    def _validate(self, epoch: int, train_loss: float, train_accuracy: float) -> EpochRecord:
        logits = logits_of(self.validated, self.val, self.options.batch_size)
        labels = torch.from_numpy(np.asarray(self.val.labels))
        predicted = networks.predicted_classes(logits)
        return EpochRecord(
            epoch,
            train_loss,
            train_accuracy,
            networks.loss(logits, labels).item(),
            (predicted == labels).double().mean().item(),
            balanced_accuracy(predicted.numpy(), labels.numpy()),
        )

    def _finish_epoch(
        self, record: EpochRecord, images_per_second: float, started: float, may_stop: bool
    ) -> None:
        self.history.append(record)
        if record is self.best:
            self.best_state = copy.deepcopy(self.validated.state_dict())
        left = (time.perf_counter() - started) * (self.total_epochs - record.epoch)
        if self.runtime.is_main:
            print_epoch(record, self.total_epochs, images_per_second, left)
        if self.on_epoch(record, images_per_second):
            self.stopped, self.pruned_at = f"pruned after epoch {record.epoch}", record.epoch
        elif may_stop and 0 < self.options.patience <= record.epoch - self.best.epoch:
            epochs = f"{self.options.patience} epoch" + ("s" if self.options.patience > 1 else "")
            self.stopped = (
                f"stopped early after epoch {record.epoch}: no better val "
                f"{self.options.score} for {epochs}"
            )
        if self.stopped and self.runtime.is_main:
            print(self.stopped, file=sys.stderr)

    def _state(self, optimizer, scheduler, phase: str) -> dict:
        return {
            "phase": phase,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "best_state": self.best_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "history": history_rows(self.history),
            "stopped": self.stopped or "",
            "pruned_at": self.pruned_at or 0,
            "steps": self.steps,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": self.generator.get_state(),
        }

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.best_state = state["best_state"]
        self.history = [EpochRecord(**row) for row in state["history"]]
        self.stopped = state["stopped"] or None
        self.pruned_at = state["pruned_at"] or None
        self.steps = state["steps"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.generator.set_state(state["generator"])
        if self.runtime.is_main:
            print(
                f"resuming after epoch {len(self.history)} from {self.checkpoint.path}",
                file=sys.stderr,
            )

    def best_model(self) -> nn.Module:
        self.model.load_state_dict(self.best_state)
        return self.model.eval()


def history_rows(history: list[EpochRecord]) -> list[dict]:
    return [asdict(record) for record in history]
