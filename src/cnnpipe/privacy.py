"""Differentially private training (DP-SGD) with Opacus, for loops that draw their own batches.

The engine slices uint8 arrays with index batches instead of iterating a DataLoader, so there is
nothing for Opacus's `PrivacyEngine.make_private` to wrap. `make_private` puts together the
same four pieces: per-image gradients (`GradSampleModule`), clipping and Gaussian noise
(`DPOptimizer`), Poisson sampling (`UniformWithReplacementSampler`, whose batches here are index
arrays) and the accountant that turns noise, sampling rate and steps into the ε spent.

Both recipes train in the one loop, `engine.Trainer` (`Trainer.run(...,
private=make_private(...))`); the model table (`models.ModelSpec.private`) says which a model
follows:
- whole: every weight of a scratch network learns, on the train split's original images (an
  offline augmented copy of an image is the same person's data: counted as another record it
  would weaken the guarantee), each drawn through the augmentation policy when sampled;
- head: a new linear head (`CenteredHead`) learns on the frozen ImageNet backbone's features
  of each train image's views (`head_features`: the original and its offline augmented copies),
  each image's gradient averaged over its views before it is clipped.

Not with DP-SGD, and why: mixup / cutmix (a mixed image holds two people's data, so one
gradient would carry two records), class weights (computed from the private labels),
DistributedDataParallel (Opacus's per-image gradients are computed in one process here).

Reproducible, not secure: the batches and the noise come from generators seeded by the
pipeline's `seed`, so two runs with the same seed write the same weights. The guarantee
therefore holds only against someone who does not know the seed, and the seed is in
params.yaml, git and MLflow: whoever has it can redraw the batches and the noise. Opacus's
secure mode (not used) draws both from a cryptographic generator (torchcsprng), sums four
Gaussian draws per noise value against floating-point attacks, and makes every run different.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
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

from cnnpipe import engine
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
    delta = default_delta(train_size) if privacy.delta == "auto" else privacy.delta
    if delta >= 1 / train_size:
        raise UserError(
            f"privacy.delta = {delta:g} is not below 1 / {train_size} training images: lower "
            f"it (or set it to auto for {default_delta(train_size):.2g})"
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


@torch.no_grad()
def head_features(
    model: TransferNet, images: np.ndarray, norm: engine.Normalisation, device: torch.device
) -> torch.Tensor:
    """What `model`'s head receives for each image (eval mode: ImageNet batch-norm statistics,
    no dropout), on the CPU, in batches of `engine.inference_batch_size`. Computed once, it
    lets a private head train for many epochs without running the backbone again: the backbone
    never sees the gradients of the training images, so it costs no privacy."""
    model = model.to(device)
    batch_size = engine.inference_batch_size(model, norm, images.shape[1], device)
    captured = []
    hook = model.head.register_forward_pre_hook(
        lambda _, args: captured.append(args[0].float().cpu())
    )
    try:
        engine.predict_logits(model, images, norm, device, batch_size)
    finally:
        hook.remove()
    return torch.cat(captured)


class CenteredHead(nn.Module):
    """A linear head on features minus a fixed centre, starting at zero: the private head.

    The centre is the val split's mean feature (val images are not training data, and the
    best epoch is chosen on them anyway); centred, a zero head starts at the uniform
    prediction and DP-SGD's noise has less to undo. `folded()` is the same function as a
    plain linear layer on the features themselves, to put back in the network."""

    def __init__(self, head: nn.Linear, center: torch.Tensor):
        super().__init__()
        self.linear = head
        self.register_buffer("center", center)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features - self.center)

    def folded(self) -> nn.Linear:
        with torch.no_grad():
            self.linear.bias -= self.linear.weight @ self.center
        return self.linear
