"""The fit / predict loop shared by the train and transfer stages.

Splits stay uint8 arrays (memory-mapped) and become float tensors one batch at a time: scaled
to [0, 1], normalised, channels_last. The loop reads top to bottom; the only things around it
are the device, the process group when several processes train (DDP), and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cnnpipe import networks
from cnnpipe.errors import UserError
from cnnpipe.store import Split


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


def best_epoch(history: list[EpochRecord]) -> EpochRecord:
    """The epoch whose weights a fit keeps: best val accuracy, then val loss, then the earliest."""
    return max(history, key=lambda r: (r.val_accuracy, -r.val_loss, -r.epoch))


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


@dataclass(frozen=True)
class Runtime:
    """Where the loop runs: the device, and this process's place among DDP processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible: use auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def keep_freed_memory() -> None:
    """Let glibc keep freed activation buffers for the next step instead of unmapping them.

    By default glibc serves blocks above 128 KiB from fresh mappings and returns them to the
    kernel when freed, so every CPU training step page-faults its activations in again. Raising
    the mmap threshold (to glibc's 32 MiB maximum) and the trim threshold keeps them: a step of
    the source document's network on CPU runs about 2x faster (docs/benchmarks.md).
    Process-wide; nothing happens where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def start_runtime(requested_device: str) -> Runtime:
    """A single process, or, under torchrun, one rank of a process group: NCCL on GPUs
    (one GPU per local rank), gloo on CPU."""
    device = resolve_device(requested_device)
    keep_freed_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), world_size)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def make_deterministic(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch; with `deterministic` on CUDA, also forbid nondeterministic
    kernels (with CUBLAS_WORKSPACE_CONFIG and no cuDNN autotuning). The CPU kernels these
    models use are deterministic already, and the switch would import torch's compiler
    (~1.5 s at every stage start)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU, where it is as fast and bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    memory-mapped reads stay sequential."""
    order = torch.randperm(size, generator=generator) if generator else torch.arange(size)
    shard = order[: size - size % world_size][rank::world_size]
    for start in range(0, len(shard), batch_size):
        yield np.sort(shard[start : start + batch_size].numpy())


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    model.eval()
    outputs = []
    for index in batch_indices(len(images), batch_size):
        with autocast(device):
            outputs.append(model(to_input(images[index], norm, device)).float().cpu())
    return torch.cat(outputs)


def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    return networks.probabilities(predict_logits(model, images, norm, device, batch_size)).numpy()


def _loss_and_accuracy(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    targets = torch.from_numpy(np.asarray(labels))
    predicted = networks.predicted_classes(logits)
    return networks.loss(logits, targets).item(), (predicted == targets).double().mean().item()


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
        torch.save(state | {"key": self.key}, staging)
        os.replace(staging, self.path)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("key") == self.key:
            return state
        set_aside = self.path.with_name("set-aside.pt")
        os.replace(self.path, set_aside)
        print(
            f"checkpoint {self.path} was written with other params or data; "
            f"set aside as {set_aside}, starting afresh",
            file=sys.stderr,
        )
        return None


def print_epoch(
    record: EpochRecord, total_epochs: int, images_per_second: float, seconds_left: float
) -> None:
    """The line a fit prints after each epoch (stderr)."""
    print(
        f"epoch {record.epoch}/{total_epochs}: train loss {record.train_loss:.4f} "
        f"acc {record.train_accuracy:.4f} | val loss {record.val_loss:.4f} "
        f"acc {record.val_accuracy:.4f} | {images_per_second:.0f} img/s "
        f"| ~{seconds_left:.0f}s left",
        file=sys.stderr,
        flush=True,
    )


def _progress(total: int, description: str) -> tqdm:
    """A redrawn bar with images/second and time left on a terminal; without one (CI, logs)
    the per-epoch line printed by the trainer is the progress report."""
    return tqdm(
        total=total, desc=description, unit="img", leave=False, disable=not sys.stderr.isatty()
    )


@dataclass
class Trainer:
    """Fits `model` on `train`, keeps the weights of the epoch with the best val accuracy,
    writes a checkpoint after every epoch and resumes from one."""

    model: nn.Module
    train: Split
    val: Split
    norm: Normalisation
    runtime: Runtime
    batch_size: int
    seed: int
    total_epochs: int
    checkpoint: Checkpoint | None = None
    # Called after each epoch; a true answer stops the fit after that epoch (a pruned trial).
    on_epoch: Callable[[EpochRecord, float], bool | None] = lambda record, speed: None
    stopped_at: int | None = None  # the epoch after which `on_epoch` stopped the fit
    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.device = self.runtime.device
        self.model.to(self.device, memory_format=torch.channels_last)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.resumed = self.checkpoint.load() if self.checkpoint else None
        if self.resumed:
            self._restore(self.resumed)

    @property
    def best(self) -> EpochRecord:
        return best_epoch(self.history)

    def steps_per_epoch(self) -> int:
        per_rank = len(self.train) // self.runtime.world_size
        return -(-per_rank // self._rank_batch_size())

    def _rank_batch_size(self) -> int:
        return max(1, self.batch_size // self.runtime.world_size)

    def run(
        self,
        optimizer: torch.optim.Optimizer,
        until_epoch: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        phase: str = "fit",
        private: PrivateSteps | None = None,
    ) -> None:
        """Train up to epoch `until_epoch`, resuming the optimiser and schedule of a
        checkpoint written in the same `phase`. The scheduler, if any, steps every batch.
        With `private` (made around this model and `optimizer`), the epochs are DP-SGD: its
        Poisson batches, per-image gradients and noisy steps, its state in the checkpoint."""
        if self.resumed and self.resumed["phase"] == phase:
            optimizer.load_state_dict(self.resumed["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(self.resumed["scheduler"])
            if private is not None:  # also when no epoch is left: it holds the ε spent
                private.load_state_dict(self.resumed["private"])
        if len(self.history) >= until_epoch:
            return
        net, stepper = self.model, optimizer
        if private is not None:
            net, stepper = private.model, private.optimizer
        elif self.runtime.world_size > 1:
            net = DistributedDataParallel(self.model, device_ids=self._device_ids())
        for epoch in range(len(self.history) + 1, until_epoch + 1):
            batches = private.batches() if private is not None else None
            self._one_epoch(net, stepper, scheduler, epoch, batches)
            if self.checkpoint and self.runtime.is_main:
                state = self._state(optimizer, scheduler, phase)
                if private is not None:
                    state["private"] = private.state_dict()
                self.checkpoint.save(state)
            if self.stopped_at is not None:
                return

    def _device_ids(self) -> list[int] | None:
        return [self.device.index] if self.device.type == "cuda" else None

    def _one_epoch(self, net: nn.Module, optimizer, scheduler, epoch: int, batches=None) -> None:
        started = time.perf_counter()
        train_loss, train_accuracy, images_per_second = self.train_epoch(
            net, optimizer, scheduler, f"epoch {epoch}", batches
        )
        self._finish_epoch(epoch, train_loss, train_accuracy, images_per_second, started)

    def train_epoch(
        self,
        net: nn.Module,
        optimizer,
        scheduler=None,
        description: str = "train",
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
        with _progress(len(self.train) // self.runtime.world_size, description) as bar:
            for index in batches:
                inputs = to_input(self.train.images[index], self.norm, self.device)
                targets = torch.from_numpy(self.train.labels[index]).to(self.device)
                with autocast(self.device):
                    logits = net(inputs)
                batch_loss = networks.loss(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if len(index):  # an empty (Poisson) batch steps too, but has no loss to count
                    correct = (networks.predicted_classes(logits.detach()) == targets).sum()
                    count = totals.new_tensor(len(index))
                    totals += torch.stack([batch_loss.detach() * len(index), correct, count])
                bar.update(len(index))
        if self.runtime.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
        return loss_sum / count, correct / count, count / (time.perf_counter() - started)

    def _finish_epoch(self, epoch, train_loss, train_accuracy, images_per_second, started) -> None:
        val_loss, val_accuracy = _loss_and_accuracy(
            predict_logits(self.model, self.val.images, self.norm, self.device), self.val.labels
        )
        record = EpochRecord(epoch, train_loss, train_accuracy, val_loss, val_accuracy)
        self.history.append(record)
        if record is self.best:
            self.best_state = copy.deepcopy(self.model.state_dict())
        left = (time.perf_counter() - started) * (self.total_epochs - epoch)
        if self.runtime.is_main:
            print_epoch(record, self.total_epochs, images_per_second, left)
            if self.on_epoch(record, images_per_second):
                self.stopped_at = epoch

    def _state(self, optimizer, scheduler, phase: str) -> dict:
        return {
            "phase": phase,
            "model": self.model.state_dict(),
            "best_state": self.best_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "history": history_rows(self.history),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": self.generator.get_state(),
        }

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.best_state = state["best_state"]
        self.history = [EpochRecord(**row) for row in state["history"]]
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
