"""The fit / predict loop shared by the train and transfer stages.

Splits stay uint8 arrays (memory-mapped) and become float tensors one batch at a time:
scaled to [0, 1], normalised, channels_last. The loop reads top to bottom.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnnpipe import models
from cnnpipe.errors import UserError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x H x W x 3 (may be memory-mapped)
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


@dataclass
class Normalisation:
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible: use auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_input(batch: np.ndarray, norm: Normalisation, device: torch.device) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float N x 3 x H x W in channels_last memory layout."""
    if not (batch.flags.writeable and batch.flags.c_contiguous):
        batch = np.array(batch, order="C")
    pixels = torch.from_numpy(batch).to(device, non_blocking=True)
    images = pixels.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


def batch_indices(
    size: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[np.ndarray]:
    """Index batches over `size` items, shuffled when a generator is given. Sorted within a
    batch so memory-mapped reads stay sequential."""
    order = torch.randperm(size, generator=generator) if generator else torch.arange(size)
    for start in range(0, size, batch_size):
        yield np.sort(order[start : start + batch_size].numpy())


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    model.eval()
    outputs = [
        model(to_input(images[index], norm, device)).float().cpu()
        for index in batch_indices(len(images), batch_size)
    ]
    return torch.cat(outputs)


def predict_probabilities(
    model: nn.Module,
    images: np.ndarray,
    norm: Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    return models.probabilities(predict_logits(model, images, norm, device, batch_size)).numpy()


def _loss_and_accuracy(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    targets = torch.from_numpy(np.asarray(labels))
    predicted = models.probabilities(logits).argmax(dim=1)
    return models.loss(logits, targets).item(), (predicted == targets).double().mean().item()


def _progress(total: int, description: str) -> tqdm:
    """A redrawn bar on a terminal; without one (CI, logs) the per-epoch line is enough."""
    return tqdm(
        total=total, desc=description, unit="img", leave=False, disable=not sys.stderr.isatty()
    )


@dataclass
class Trainer:
    """Fits `model` on `train`, keeps the weights of the epoch with the best val accuracy."""

    model: nn.Module
    train: Split
    val: Split
    norm: Normalisation
    device: torch.device
    batch_size: int
    seed: int
    on_epoch: Callable[[EpochRecord, float], None] = lambda record, images_per_second: None
    history: list[EpochRecord] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.model.to(self.device, memory_format=torch.channels_last)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def best(self) -> EpochRecord:
        return max(self.history, key=lambda r: (r.val_accuracy, -r.val_loss, -r.epoch))

    def steps_per_epoch(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def run(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        """Train `epochs` more epochs; `scheduler`, if any, steps once per batch."""
        for _ in range(epochs):
            self._one_epoch(optimizer, scheduler, epoch=len(self.history) + 1)

    def _one_epoch(self, optimizer, scheduler, epoch: int) -> None:
        self.model.train()
        started = time.perf_counter()
        loss_sum, correct = 0.0, 0
        with _progress(len(self.train), f"epoch {epoch}") as bar:
            for index in batch_indices(len(self.train), self.batch_size, self.generator):
                inputs = to_input(self.train.images[index], self.norm, self.device)
                targets = torch.from_numpy(self.train.labels[index]).to(self.device)
                logits = self.model(inputs)
                batch_loss = models.loss(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                loss_sum += batch_loss.item() * len(index)
                correct += (models.probabilities(logits).argmax(1) == targets).sum().item()
                bar.update(len(index))
        images_per_second = len(self.train) / (time.perf_counter() - started)
        val_loss, val_accuracy = _loss_and_accuracy(
            predict_logits(self.model, self.val.images, self.norm, self.device), self.val.labels
        )
        record = EpochRecord(
            epoch, loss_sum / len(self.train), correct / len(self.train), val_loss, val_accuracy
        )
        self.history.append(record)
        if record is self.best:
            self.best_state = copy.deepcopy(self.model.state_dict())
        print(
            f"epoch {epoch}: train loss {record.train_loss:.4f} acc {record.train_accuracy:.4f}"
            f" | val loss {val_loss:.4f} acc {val_accuracy:.4f} | {images_per_second:.0f} img/s",
            file=sys.stderr,
            flush=True,
        )
        self.on_epoch(record, images_per_second)

    def best_model(self) -> nn.Module:
        self.model.load_state_dict(self.best_state)
        return self.model.eval()


def history_rows(history: list[EpochRecord]) -> list[dict]:
    return [asdict(record) for record in history]
