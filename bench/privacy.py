"""Test accuracy against the privacy budget ε on builtin:digits, for both private recipes.

    uv run python bench/privacy.py --epsilons 1 3 8 off --seeds 0 1 2

Data: builtin:digits at 32x32 with the pipeline's split (65 / 15 / 20 % train / val / test,
stratified, seed 42) and, for transfer, the augment stage's copies (default policy, seed 42).
DP-SGD counts each training image once: an image and its augmented copy as two records would
make the guarantee one for pairs, not images.

- scratch: `seed_cnn` (the source document's CNN) trained end to end with DP-SGD (Adam) on the
  un-augmented train images.
- transfer: `efficientnet_lite0` with ImageNet weights, frozen; its linear head trained
  privately (`privacy.fit_head`) on the features of each train image and its `--copies`
  augmented copies, the gradients averaged per image (augmentation multiplicity).
- off: the same network and data without DP (plain Adam, shuffled batches; for transfer every
  view its own row), for the cost of privacy; the pipeline's own non-private recipes
  (fine-tuning the whole backbone) are in the README.

Each fit keeps the epoch with the best val accuracy, as the pipeline does. Prints a markdown
table: per model and ε the median test accuracy over the seeds [min, max], the ε spent
(δ = 1 / (10 x training images)) and the median seconds per fit.
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnpipe import audit, engine, models, privacy, sources
from cnnpipe.engine import Split
from cnnpipe.params import AugmentParams, PrivacyParams
from cnnpipe.stages.augment import augmented_copies, build_policy
from cnnpipe.stages.prepare import split_indices

CPU = torch.device("cpu")
# The recommended `privacy` settings of each stage (tuned here; see the module docstring).
SCRATCH = dict(delta=None, max_grad_norm=1.0, epochs=40, batch_size=512, lr=4e-3)
TRANSFER = dict(delta=None, max_grad_norm=2.0, epochs=40, batch_size=256, lr=0.05)
PLAIN = dict(epochs=30, batch_size=64, lr=1e-3)


def digits_splits() -> dict[str, Split]:
    data = sources.load_source("builtin:digits", 32)
    splits = split_indices(data.labels, val_fraction=0.15, test_fraction=0.2, seed=42)
    return {name: Split(data.images[rows], data.labels[rows]) for name, rows in splits.items()}


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return (models.predicted_classes(logits).numpy() == labels).mean().item()


def fit_best(
    model: nn.Module,
    epochs: int,
    train_one_epoch: Callable[[], None],
    val_logits: Callable[[], torch.Tensor],
    val_labels: np.ndarray,
) -> nn.Module:
    """Train epoch by epoch; leave the weights of the epoch with the best val accuracy."""
    best, best_state = -1.0, None
    for _ in range(epochs):
        train_one_epoch()
        score = accuracy(val_logits(), val_labels)
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model


def plain_epoch(
    model: nn.Module, optimizer, inputs: Callable, labels: np.ndarray, generator: torch.Generator
) -> None:
    model.train()
    targets = torch.from_numpy(labels)
    for index in engine.batch_indices(len(labels), PLAIN["batch_size"], generator):
        optimizer.zero_grad()
        models.loss(model(inputs(index)), targets[index]).backward()
        optimizer.step()


@dataclass
class Outcome:
    accuracy: float  # on the test split
    epsilon: float  # spent; inf without DP
    audit_auc: float  # membership inference: train (un-augmented) against test images


def outcome(
    test_logits: torch.Tensor, test_labels: np.ndarray, member_losses: np.ndarray, epsilon: float
) -> Outcome:
    nonmember_losses = models.loss(
        test_logits, torch.from_numpy(test_labels), reduction="none"
    ).numpy()
    auc = audit.membership_auc(member_losses, nonmember_losses, seed=0)
    return Outcome(accuracy(test_logits, test_labels), epsilon, auc)


def scratch_run(splits: dict[str, Split], epsilon: float | None, seed: int) -> Outcome:
    """seed_cnn trained privately (or not)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    norm = engine.Normalisation(*models.normalisation("seed_cnn"))
    model = privacy.dp_compatible(models.create_model("seed_cnn", num_classes=10, image_size=32))
    train, val, test = splits["train"], splits["val"], splits["test"]

    def inputs(index: np.ndarray) -> torch.Tensor:
        return engine.to_input(train.images[index], norm, CPU)

    def logits(split: Split) -> torch.Tensor:
        return engine.predict_logits(model, split.images, norm, CPU)

    if epsilon is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=PLAIN["lr"])
        fit_best(
            model,
            PLAIN["epochs"],
            lambda: plain_epoch(model, optimizer, inputs, train.labels, generator),
            lambda: logits(val),
            val.labels,
        )
        spent = float("inf")
    else:
        spent = scratch_private(
            model, train, inputs, lambda: logits(val), val.labels, epsilon, seed
        )
    members = audit.per_image_losses(model, train.images, train.labels, norm, CPU)
    return outcome(logits(test), test.labels, members, spent)


def scratch_private(model, train, inputs, val_logits, val_labels, epsilon, seed) -> float:
    """Train `model` privately; the ε spent."""
    generator = torch.Generator().manual_seed(seed)
    settings = PrivacyParams(epsilon=epsilon, **SCRATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    fit = privacy.make_private(
        model, optimizer, train_size=len(train), privacy=settings, generator=generator
    )
    labels = torch.from_numpy(train.labels)
    fit_best(
        model,
        settings.epochs,
        lambda: privacy.train_epoch(fit, inputs, labels),
        val_logits,
        val_labels,
    )
    return fit.epsilon()


def augmented_train(train: Split, copies: int) -> Split:
    """The augment stage's train split: the images, then `copies` augmented copies of them
    (the default policy, seed 42)."""
    policy = build_policy(AugmentParams(), seed=42)
    images = np.concatenate([train.images, augmented_copies(train.images, policy, copies)])
    return Split(images, np.tile(train.labels, copies + 1))


def transfer_features(
    splits: dict[str, Split], input_size: int, copies: int
) -> dict[str, torch.Tensor]:
    """What the frozen ImageNet backbone's head receives, per split (computed once); train as
    images x (1 + copies) views x features."""
    model = models.create_model(
        "efficientnet_lite0", num_classes=10, image_size=32, input_size=input_size, pretrained=True
    )
    norm = engine.Normalisation(*models.normalisation("efficientnet_lite0"))
    features = {
        name: privacy.head_features(model, split.images, norm, CPU)
        for name, split in splits.items()
    }
    train = augmented_train(splits["train"], copies)
    views = privacy.head_features(model, train.images, norm, CPU)
    return features | {"train": privacy.by_image(views, copies + 1)}


def transfer_run(
    splits: dict[str, Split], features: dict[str, torch.Tensor], epsilon: float | None, seed: int
) -> Outcome:
    """A linear head on the frozen features, trained privately (or not)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(features["train"].shape[-1], 10)
    train, val = splits["train"], splits["val"]
    if epsilon is None:  # every view its own row, as in the non-private pipeline
        rows = features["train"].flatten(0, 1)
        labels = train.labels.repeat(features["train"].shape[1])
        optimizer = torch.optim.Adam(head.parameters(), lr=PLAIN["lr"])
        fit_best(
            head,
            PLAIN["epochs"],
            lambda: plain_epoch(head, optimizer, rows.__getitem__, labels, generator),
            lambda: head(features["val"]).detach(),
            val.labels,
        )
        spent = float("inf")
    else:
        settings = PrivacyParams(epsilon=epsilon, **TRANSFER)
        result = privacy.fit_head(
            head,
            features["train"],
            train.labels,
            features["val"],
            val.labels,
            settings,
            generator,
        )
        spent = result.epsilons[-1]
    with torch.no_grad():
        originals = features["train"][:, 0]  # the members: each train image as it is
        members = models.loss(head(originals), torch.from_numpy(train.labels), reduction="none")
        return outcome(head(features["test"]), splits["test"].labels, members.numpy(), spent)


def measure(run: Callable[[int], Outcome], seeds: list[int]) -> str:
    """One table row's cells: accuracy median [min, max], ε spent (max), audit AUC median
    [min, max], seconds per fit (median)."""
    outcomes, seconds = [], []
    for seed in seeds:
        started = time.perf_counter()
        outcomes.append(run(seed))
        seconds.append(time.perf_counter() - started)
    spent = max(o.epsilon for o in outcomes)
    return " | ".join(
        [
            spread([o.accuracy for o in outcomes], "{:.1%}"),
            "–" if spent == float("inf") else f"{spent:.2f}",
            spread([o.audit_auc for o in outcomes], "{:.3f}"),
            f"{statistics.median(seconds):.0f}",
        ]
    )


def spread(values: list[float], form: str) -> str:
    """The median [min, max]."""
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{form.format(median)} [{form.format(low)}, {form.format(high)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "off"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["scratch", "transfer"])
    parser.add_argument("--input-size", type=int, default=64, help="transfer's input_size")
    parser.add_argument("--copies", type=int, default=1, help="augmented views per train image")
    args = parser.parse_args()
    epsilons = [None if e == "off" else float(e) for e in args.epsilons]
    splits = digits_splits()
    print(
        f"# {platform.node()}: {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"train {len(splits['train'])} / val {len(splits['val'])} / test {len(splits['test'])}"
        f" images; seeds {args.seeds}; scratch {SCRATCH}; transfer {TRANSFER} at "
        f"input_size {args.input_size}; off {PLAIN}\n"
    )
    print(
        "| model | ε target | test accuracy, median [min, max] | ε spent "
        "| audit AUC, median [min, max] | s / fit |"
    )
    print("|---|---|---|---|---|---|")
    runs = {"scratch": functools.partial(scratch_run, splits)}
    if "transfer" in args.models:
        features = transfer_features(splits, args.input_size, args.copies)
        runs["transfer"] = functools.partial(transfer_run, splits, features)
    for name in args.models:
        for epsilon in epsilons:
            cells = measure(functools.partial(runs[name], epsilon), args.seeds)
            target = "off" if epsilon is None else f"{epsilon:g}"
            print(f"| {name} | {target} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
