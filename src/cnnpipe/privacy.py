"""Differentially private training (DP-SGD) with Opacus, for a loop that draws its own batches.

The engine slices uint8 arrays with index batches instead of iterating a DataLoader, so there is
nothing for Opacus's `PrivacyEngine.make_private` to wrap. `make_private` puts together the
same four pieces: per-image gradients (`GradSampleModule`), clipping and Gaussian noise
(`DPOptimizer`), Poisson sampling (`UniformWithReplacementSampler`, whose batches here are index
arrays) and the accountant that turns noise, sampling rate and steps into the ε spent.

Reproducible, not secure: the batches and the noise come from the run's seeded generator, so
two runs with the same seed write the same weights. The guarantee therefore holds only against
someone who does not know the seed: whoever has it can redraw the batches and the noise. A
release should use a seed kept secret. Opacus's secure mode (not used) draws both from
/dev/urandom through torchcsprng, sums several Gaussian draws per noise value against
floating-point attacks, and makes every run different.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from cnnpipe import engine, networks
from cnnpipe.errors import UserError
from cnnpipe.networks import TransferNet
from cnnpipe.params import PrivacyParams

# Rényi DP, the accountant of the DP-SGD papers. Opacus's default, PRV, needs about 6 % less
# noise for ε = 8 here, but takes seconds to minutes to calibrate at large ε and fails outright
# at some ("Discrete mean differs significantly from continuous mean" at ε = 10^4).
ACCOUNTANT = "rdp"


def default_delta(train_size: int) -> float:
    """δ, the chance that the ε guarantee fails, must be well below 1 / (training images): a
    mechanism that publishes one random image outright still meets δ = 1 / N. A tenth of that."""
    return 1 / (10 * train_size)


def dp_compatible(model: nn.Module) -> nn.Module:
    """`model` with batch norm replaced by group norm (Opacus's `ModuleValidator.fix`), which
    changes the architecture: a saved private model is rebuilt by applying this again.

    Batch norm mixes the images of a batch, so an image's gradient is not its own. In-place
    activations are switched off because Opacus's backward hooks cannot see through them; that
    changes no weight."""
    fixed = ModuleValidator.fix(model)
    for module in fixed.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    _require_compatible(fixed)
    return fixed


def _require_compatible(model: nn.Module) -> None:
    """Stop with one line if Opacus cannot compute per-image gradients for `model` (e.g. a
    layer with buffers it cannot fix, like timm's BatchNormAct2d)."""
    errors = [*ModuleValidator.validate(model.train()), *GradSampleModule.validate(model)]
    if errors:
        reason = " ".join(str(errors[0]).split())
        raise UserError(f"{type(model).__name__} cannot be trained privately: {reason}")


@dataclass
class PrivateFit:
    """A model and optimiser made private, the batches to train them on, and the ε spent.

    Train with `model` (it computes per-image gradients) and `optimizer` (it clips and noises
    them) on the index batches of `batches()`, one call per epoch. A batch may be small or even
    empty: the optimiser must still step on it (an empty step adds noise only), because the
    guarantee counts every step. Resuming needs `state_dict()` and the sampler's generator."""

    model: GradSampleModule
    optimizer: DPOptimizer
    sampler: UniformWithReplacementSampler
    accountant: IAccountant
    noise_multiplier: float
    delta: float

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
        return self.accountant.get_epsilon(self.delta) if self.accountant.history else 0.0

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.optimizer.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.optimizer.generator.set_state(state["noise"])


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    train_size: int,
    privacy: PrivacyParams,
    generator: torch.Generator,
) -> PrivateFit:
    """DP-SGD for `privacy.epochs` epochs of Poisson batches of `privacy.batch_size` images on
    average out of `train_size`, with the noise Opacus's accountant sets so that the whole fit
    spends at most `privacy.epsilon` at `privacy.delta`. `model` must be DP-compatible
    (`dp_compatible`) already and `optimizer` must hold its parameters; `generator` (CPU)
    draws the batches and seeds the noise. The model is wrapped, not copied: training the
    wrapper trains `model`."""
    if not privacy.enabled:
        raise ValueError("make_private needs privacy.epsilon")
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise UserError(
            "private training runs in one process: set nproc: 1 (Opacus's distributed "
            "Poisson sampling and noise are not wired into the engine)"
        )
    _require_compatible(model)
    delta = privacy.delta if privacy.delta is not None else default_delta(train_size)
    if delta >= 1 / train_size:
        raise UserError(
            f"privacy.delta = {delta} is not below 1 / {train_size} training images: "
            f"lower it (or leave it null for {default_delta(train_size):.2g})"
        )
    expected_batch_size = min(privacy.batch_size, train_size)
    sample_rate = expected_batch_size / train_size
    steps_per_epoch = round(train_size / expected_batch_size)
    noise_multiplier = get_noise_multiplier(
        target_epsilon=privacy.epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=privacy.epochs * steps_per_epoch,
        accountant=ACCOUNTANT,
    )
    device = next(model.parameters()).device
    seed = int(torch.randint(2**62, (1,), generator=generator))
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=torch.Generator(device).manual_seed(seed),
    )
    accountant = create_accountant(ACCOUNTANT)
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate))
    sampler = UniformWithReplacementSampler(
        num_samples=train_size, sample_rate=sample_rate, generator=generator, steps=steps_per_epoch
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
    """One epoch of DP-SGD over `fit.batches()`: (mean loss, accuracy) over the images drawn.

    `inputs(index)` returns the model's input for those images, on the model's device. Logits
    of shape images x views x outputs (a linear head on several augmented views of each image,
    `by_image`) train on the mean loss over the views: each image's gradient is averaged over
    its views before it is clipped, so an image still counts once (augmentation multiplicity,
    De et al. 2022)."""
    fit.model.train()
    loss_sum, correct, count = 0.0, 0, 0
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
    head = model.backbone.get_submodule(model.head_name)
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].float().cpu()))
    try:
        engine.predict_logits(model.to(device), images, norm, device, batch_size)
    finally:
        hook.remove()
    return torch.cat(captured)


def by_image(rows: torch.Tensor, views: int) -> torch.Tensor:
    """Rows in the augment stage's order (all originals, then all first copies, ...) as
    images x views x ...: row i + k * images is view k of image i."""
    return rows.reshape(views, -1, *rows.shape[1:]).transpose(0, 1)


@dataclass
class HeadFit:
    """The epochs of a private head fit and the ε spent after each. The head released is the
    best epoch's, but choosing it looked at every epoch's weights: its guarantee is the last ε.
    """

    history: list[engine.EpochRecord]
    epsilons: list[float]

    @property
    def best(self) -> engine.EpochRecord:
        return max(self.history, key=lambda r: (r.val_accuracy, -r.val_loss, -r.epoch))


def _center_into_bias(head: nn.Linear, center: torch.Tensor) -> None:
    """A head trained on `features - center` as one that takes the features themselves."""
    with torch.no_grad():
        head.bias -= head.weight @ center


def fit_head(
    head: nn.Linear,
    train_features: torch.Tensor,
    train_labels: np.ndarray,
    val_features: torch.Tensor,
    val_labels: np.ndarray,
    privacy: PrivacyParams,
    generator: torch.Generator,
) -> HeadFit:
    """Train a linear `head` with DP-SGD on frozen pretrained features (`head_features`), the
    recipe behind the strongest private image classifiers (Tramèr & Boneh, 2021): the public
    backbone does the heavy lifting, and the private part has few parameters to add noise to.

    `train_features` is images x features, or images x views x features for several augmented
    views of each image (`by_image`), whose gradients are averaged per image. The features are
    centred on the mean val feature (val images are not training data, and the best epoch is
    chosen on them anyway); the head starts at zero and learns with momentum SGD on a cosine
    schedule. The best epoch's weights are left in `head` (on the CPU), the centring folded
    into its bias, so it takes the plain features like the head it replaces."""
    center = val_features.mean(dim=0)
    train_x, val_x = train_features - center, val_features - center
    train_y, val_y = torch.from_numpy(train_labels), torch.from_numpy(val_labels)
    head.cpu()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=privacy.lr, momentum=0.9)
    fit = make_private(
        head, optimizer, train_size=len(train_y), privacy=privacy, generator=generator
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, privacy.epochs * fit.steps_per_epoch
    )
    result, best_state = HeadFit([], []), None
    for epoch in range(1, privacy.epochs + 1):
        train_loss, train_accuracy = train_epoch(fit, train_x.__getitem__, train_y, schedule)
        with torch.no_grad():
            logits = head(val_x)
        val_accuracy = (networks.predicted_classes(logits) == val_y).double().mean().item()
        record = engine.EpochRecord(
            epoch, train_loss, train_accuracy, networks.loss(logits, val_y).item(), val_accuracy
        )
        result.history.append(record)
        result.epsilons.append(fit.epsilon())
        if record is result.best:
            best_state = {name: value.clone() for name, value in head.state_dict().items()}
    head.load_state_dict(best_state)
    _center_into_bias(head, center)
    return result
