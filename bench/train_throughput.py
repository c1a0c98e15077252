"""Training throughput: the engine against a bare loop and a tutorial-style DataLoader loop.

In one process, on the same model and data, times one training epoch of
  (a) a bare loop over batches of an in-memory float tensor (the ceiling),
  (b) the engine (`engine.Trainer.train_epoch`: uint8 memory-mapped split -> tensors per batch),
  (c) a PyTorch-tutorial loop: a `Dataset` returning one transformed sample at a time
      (PIL image -> `ToTensor` -> `Normalize`) through a `DataLoader`,
and prints images/second (median of --repeats rounds, the loops taking turns) and the
ratios b/a and b/c.

    uv run python bench/train_throughput.py [--models seed_cnn small_cnn] [--image-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cnnpipe import engine, models, store
from cnnpipe.sources import load_source

NORM = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CPU = torch.device("cpu")


def fresh(model_name: str, image_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = models.create_model(model_name, num_classes=10, image_size=image_size)
    model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as the train stage


def step(model, optimizer, inputs, targets) -> None:
    loss = models.loss(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bare_loop(images: np.ndarray, labels: np.ndarray, args) -> float:
    model, optimizer = fresh(args.model, args.image_size)
    inputs = engine.to_input(images, NORM, CPU)  # everything converted up front
    targets = torch.from_numpy(labels)
    model.train()
    started = time.perf_counter()
    order = torch.randperm(len(labels))
    for start in range(0, len(labels), args.batch_size):
        index = order[start : start + args.batch_size]
        step(model, optimizer, inputs[index], targets[index])
    return len(labels) / (time.perf_counter() - started)


def engine_loop(split: engine.Split, args) -> float:
    model, optimizer = fresh(args.model, args.image_size)
    trainer = engine.Trainer(
        model, split, split, NORM, engine.Runtime(CPU), args.batch_size, 0, total_epochs=1
    )
    return trainer.train_epoch(model, optimizer)[2]


class TutorialDataset(Dataset):
    """One sample at a time, as in the PyTorch data-loading tutorial."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(NORM.mean, NORM.std)]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def tutorial_loop(images: np.ndarray, labels: np.ndarray, args, workers: int) -> float:
    model, optimizer = fresh(args.model, args.image_size)
    loader = DataLoader(
        TutorialDataset(images, labels),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
    )
    model.train()
    started = time.perf_counter()
    for inputs, targets in loader:
        step(model, optimizer, inputs, targets)
    return len(labels) / (time.perf_counter() - started)


def measure(images: np.ndarray, labels: np.ndarray, split: engine.Split, args) -> dict:
    """Median images/s of each loop. The loops take turns, one epoch each per round, so a
    change in the machine's load between rounds touches all of them alike."""
    loops = {
        "a bare loop, in-memory tensors": lambda: bare_loop(images, labels, args),
        "b engine, memory-mapped uint8": lambda: engine_loop(split, args),
        "c tutorial Dataset + DataLoader, 0 workers": lambda: tutorial_loop(
            images, labels, args, 0
        ),
        "c tutorial Dataset + DataLoader, 2 workers": lambda: tutorial_loop(
            images, labels, args, 2
        ),
    }
    for loop in loops.values():
        loop()  # warm-up: allocator, oneDNN kernels, worker start-up code paths
    rounds = [{name: loop() for name, loop in loops.items()} for _ in range(args.repeats)]
    return {name: statistics.median(one[name] for one in rounds) for name in loops}


def report(rates: dict, images: int, args) -> None:
    a = rates["a bare loop, in-memory tensors"]
    b = rates["b engine, memory-mapped uint8"]
    c = max(v for k, v in rates.items() if k.startswith("c "))
    print(
        f"\n{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{images} images, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| loop | images/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} |")
    print(f"\nb/a = {b / a:.2f}   b/c = {b / c:.2f} (c = the faster tutorial variant)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seed_cnn", "small_cnn"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--copies", type=int, default=2, help="train set = digits x copies")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine.keep_freed_memory()  # what the stages do; process-wide, so all three loops gain

    loaded = load_source("builtin:digits", args.image_size)
    images = np.concatenate([loaded.images] * args.copies)
    labels = np.concatenate([loaded.labels] * args.copies)
    with tempfile.TemporaryDirectory() as folder:
        store.write_split(Path(folder), "train", images, labels)
        split = engine.Split(*store.read_split(Path(folder), "train"))  # memory-mapped
        for name in args.models:
            one_model = argparse.Namespace(**vars(args), model=name)
            report(measure(images, labels, split, one_model), len(labels), one_model)


if __name__ == "__main__":
    main()
