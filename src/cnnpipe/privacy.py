"""Differentially private training (DP-SGD) with Opacus, for loops that draw their own batches.

The engine slices uint8 arrays with index batches instead of iterating a DataLoader, so there is
nothing for Opacus's `PrivacyEngine.make_private` to wrap. `make_private` puts together the
same four pieces: per-image gradients (`GradSampleModule`), clipping and Gaussian noise
(`DPOptimizer`), Poisson sampling (`UniformWithReplacementSampler`, whose batches here are index
arrays) and the accountant that turns noise, sampling rate and steps into the ε spent.

The model table (`models.ModelSpec.private`) says which of two recipes a model follows:
- whole: every weight of a scratch network learns, in `engine.Trainer` (`Trainer.run(...,
  private=make_private(...))`), on the un-augmented train split: an augmented copy of an image
  is the same person's data, and counted as another record it would weaken the guarantee;
- head: a new linear head learns on the frozen ImageNet backbone's features (`fit_head`), each
  image's gradient averaged over its augmented copies before it is clipped.

Reproducible, not secure: the batches and the noise come from generators seeded by the
pipeline's `seed`, so two runs with the same seed write the same weights. The guarantee
therefore holds only against someone who does not know the seed, and the seed is in
params.yaml, git and MLflow: whoever has it can redraw the batches and the noise. Opacus's
secure mode (not used) draws both from a cryptographic generator (torchcsprng), sums four
Gaussian draws per noise value against floating-point attacks, and makes every run different.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from cnnpipe import engine, networks
from cnnpipe.errors import UserError
from cnnpipe.networks import TransferNet
from cnnpipe.params import PrivacyParams

# Opacus's hooks on a network's first layer, whose input needs no gradient, make PyTorch warn at
# every backward pass; harmless: the per-image gradients are those of the weights.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed"
)

# Rényi DP, the accountant of the DP-SGD papers. Opacus's default, PRV, needs about 6 % less
# noise for ε = 8 here, but takes seconds to minutes to calibrate at large ε and fails outright
# at some ("Discrete mean differs significantly from continuous mean" at ε = 10^4).
ACCOUNTANT = "rdp"
# The Rényi orders the accountant searches for the tightest ε: Opacus's, extended up to 1024.
# A short fit (a few noisy steps, as in a tiny run) finds its best order above Opacus's largest,
# 63, and Opacus then warns that the bound could be tighter; with these it is.
ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, *(2**k for k in range(6, 11))]


def default_delta(train_size: int) -> float:
    """δ, the chance that the ε guarantee fails, must be well below 1 / (training images): a
    mechanism that publishes one random image outright still meets δ = 1 / N. A tenth of that."""
    return 1 / (10 * train_size)


def delta_for(privacy: PrivacyParams, train_size: int) -> float:
    """The δ of a fit on `train_size` images: `privacy.delta`, or `default_delta`. A δ not below
    1 / `train_size` is a one-line `UserError`."""
    delta = privacy.delta if privacy.delta is not None else default_delta(train_size)
    if delta >= 1 / train_size:
        raise UserError(
            f"privacy.delta = {delta:g} is not below 1 / {train_size} training images: lower "
            f"it (or set it to null for {default_delta(train_size):.2g})"
        )
    return delta


def require_compatible(model: nn.Module) -> None:
    """Stop with one line if Opacus cannot compute per-image gradients for `model`, e.g. batch
    norm (it mixes the images of a batch, so an image's gradient is not its own)."""
    errors = [*ModuleValidator.validate(model.train()), *GradSampleModule.validate(model)]
    if errors:
        reason = " ".join(str(errors[0]).split())
        raise UserError(f"{type(model).__name__} cannot be trained privately: {reason[:300]}")


def seeded_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Two independent CPU generators derived from `seed`: one draws the batches, one the noise."""
    batches, noise = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(batches)), torch.Generator().manual_seed(int(noise))


@dataclass
class PrivateFit:
    """A model and optimiser made private, the batches to train them on, and the ε spent.

    Train with `model` (it computes per-image gradients) and `optimizer` (it clips and noises
    them) on the index batches of `batches()`, one call per epoch. A batch may be small or even
    empty: the optimiser must still step on it (an empty step adds noise only), because the
    guarantee counts every step. `state_dict()` holds what resuming needs besides the model
    and the wrapped optimiser: the accountant and both generators."""

    model: GradSampleModule
    optimizer: DPOptimizer
    sampler: UniformWithReplacementSampler
    accountant: IAccountant
    noise_multiplier: float
    delta: float

    @property
    def network(self) -> nn.Module:
        """The model that learns, unwrapped."""
        return self.model._module

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def batches(self) -> Iterator[np.ndarray]:
        """One epoch of Poisson batches: each image is in each batch with probability
        batch_size / train_size, independently (sorted indices, possibly none)."""
        for indices in self.sampler:
            yield np.asarray(indices, dtype=np.int64)

    def epsilon(self) -> float:
        """The ε spent so far at `delta`, by the accountant's count of the steps taken."""
        if not self.accountant.history:
            return 0.0
        return self.accountant.get_epsilon(self.delta, alphas=ALPHAS)

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "batches": self.sampler.generator.get_state(),
            "noise": self.optimizer.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.sampler.generator.set_state(state["batches"])
        self.optimizer.generator.set_state(state["noise"])


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    train_size: int,
    privacy: PrivacyParams,
    seed: int,
) -> PrivateFit:
    """DP-SGD for `privacy.epochs` epochs of Poisson batches of `privacy.batch_size` images on
    average out of `train_size`, with the noise Opacus's accountant sets so that the whole fit
    spends at most `privacy.epsilon` at δ (`delta_for`). `optimizer` must hold `model`'s
    parameters; `seed` seeds the batches and the noise. The model is wrapped, not copied:
    training the wrapper trains `model`."""
    require_compatible(model)
    delta = delta_for(privacy, train_size)
    expected_batch_size = min(privacy.batch_size, train_size)
    sample_rate = expected_batch_size / train_size
    steps_per_epoch = round(train_size / expected_batch_size)
    noise_multiplier = get_noise_multiplier(
        target_epsilon=privacy.epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=privacy.epochs * steps_per_epoch,
        accountant=ACCOUNTANT,
        alphas=ALPHAS,
    )
    batch_generator, noise_generator = seeded_generators(seed)
    device = next(model.parameters()).device
    if device.type != "cpu":  # the noise is drawn where the gradients are
        noise_generator = torch.Generator(device).manual_seed(noise_generator.initial_seed())
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=noise_generator,
    )
    accountant = create_accountant(ACCOUNTANT)
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate))
    sampler = UniformWithReplacementSampler(
        num_samples=train_size,
        sample_rate=sample_rate,
        generator=batch_generator,
        steps=steps_per_epoch,
    )
    return PrivateFit(
        GradSampleModule(model), dp_optimizer, sampler, accountant, noise_multiplier, delta
    )


def train_epoch(
    fit: PrivateFit,
    inputs: Callable[[np.ndarray], torch.Tensor],
    labels: torch.Tensor,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[float, float]:
    """One epoch of DP-SGD over `fit.batches()` for a head on features: (mean loss, accuracy)
    over the images drawn. (Networks trained on images go through `engine.Trainer` instead.)

    `inputs(index)` returns the head's input for those images. Logits of shape images x views
    x outputs (several augmented views of each image, `by_image`) train on the mean loss over
    the views: each image's gradient is averaged over its views before it is clipped, so an
    image still counts once (augmentation multiplicity, De et al. 2022)."""
    fit.model.train()
    loss_sum, correct, count = 0.0, 0.0, 0
    for index in fit.batches():
        logits = fit.model(inputs(index))
        views = logits.shape[1] if logits.dim() == 3 else 1
        logits = logits.reshape(-1, logits.shape[-1])
        targets = labels[index].repeat_interleave(views)
        batch_loss = networks.loss(logits, targets)
        fit.optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        fit.optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if len(index):  # the mean loss of an empty batch is NaN
            count += len(index)
            loss_sum += batch_loss.item() * len(index)
            correct += int((networks.predicted_classes(logits.detach()) == targets).sum()) / views
    return loss_sum / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def head_features(
    model: TransferNet,
    images: np.ndarray,
    norm: engine.Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """What `model`'s head receives for each image (eval mode: ImageNet batch-norm statistics,
    no dropout), on the CPU. Computed once, it lets a private head train for many epochs
    without running the backbone again: the backbone never sees the gradients of the training
    images, so it costs no privacy."""
    captured = []
    hook = model.head.register_forward_pre_hook(
        lambda _, args: captured.append(args[0].float().cpu())
    )
    try:
        engine.predict_logits(model.to(device), images, norm, device, batch_size)
    finally:
        hook.remove()
    return torch.cat(captured)


def by_image(rows: torch.Tensor, views: int) -> torch.Tensor:
    """Rows in the augment stage's order (all originals, then all first copies, ...) as
    images x views x ...: row i + k * images is view k of image i."""
    return rows.reshape(views, -1, *rows.shape[1:]).transpose(0, 1)


def _center_into_bias(head: nn.Linear, center: torch.Tensor) -> None:
    """A head trained on `features - center` as one that takes the features themselves."""
    with torch.no_grad():
        head.bias -= head.weight @ center


def fit_head(
    fit: PrivateFit,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    train: tuple[torch.Tensor, np.ndarray],
    val: tuple[torch.Tensor, np.ndarray],
    epochs: int,
    checkpoint: engine.Checkpoint | None = None,
    on_epoch: Callable[[engine.EpochRecord, float], None] = lambda record, speed: None,
) -> list[engine.EpochRecord]:
    """Train a linear head (`fit`, made by `make_private` around the head and `optimizer`) with
    DP-SGD on frozen pretrained features (`head_features`): the recipe behind the strongest
    private image classifiers (Tramèr & Boneh, 2021). The public backbone does the heavy
    lifting; the private part has few parameters to add noise to. Returns the history.

    `train` is (features, labels): images x views x features, the views being augmented copies
    of each image (`by_image`), whose gradients are averaged per image. `val` is (features,
    labels) of the val split, whose mean feature centres all features (val images are not
    training data, and the best epoch is chosen on them anyway); the head starts at zero. After
    each epoch `on_epoch(record, images per second)` is called and `checkpoint` saved; a
    checkpoint is resumed from. The best epoch's weights are left in the head, the centring
    folded into its bias, so it takes the plain features like the head it replaces."""
    head = fit.network
    center = val[0].mean(dim=0)
    train_x, val_x = train[0] - center, val[0] - center
    train_y, val_y = torch.from_numpy(train[1]), torch.from_numpy(val[1])
    parts = {"head": head, "optimizer": optimizer, "schedule": schedule, "private": fit}
    history, best_state = [], None
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    saved = checkpoint.load() if checkpoint else None
    if saved:
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        history = [engine.EpochRecord(**row) for row in saved["history"]]
        best_state = saved["best_state"]
    for epoch in range(len(history) + 1, epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy = train_epoch(fit, train_x.__getitem__, train_y, schedule)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            logits = head(val_x)
        val_accuracy = (networks.predicted_classes(logits) == val_y).double().mean().item()
        val_loss = networks.loss(logits, val_y).item()
        history.append(
            engine.EpochRecord(epoch, train_loss, train_accuracy, val_loss, val_accuracy)
        )
        if history[-1] is engine.best_epoch(history):
            best_state = {name: value.clone() for name, value in head.state_dict().items()}
        engine.print_epoch(history[-1], epochs, len(train_y) / seconds, seconds * (epochs - epoch))
        on_epoch(history[-1], len(train_y) / seconds)
        if checkpoint:
            state = {name: part.state_dict() for name, part in parts.items()}
            checkpoint.save(
                state | {"history": engine.history_rows(history), "best_state": best_state}
            )
    head.load_state_dict(best_state)
    _center_into_bias(head, center)
    return history
