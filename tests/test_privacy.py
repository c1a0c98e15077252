"""DP-SGD with Opacus on real digits: the budget, reproducibility, resuming, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from pydantic import ValidationError
from timm.layers import BatchNormAct2d
from torch import nn

from cnnpipe import engine, networks, privacy, sources, store
from cnnpipe.errors import UserError
from cnnpipe.params import PrivacyParams

SIZE = 16
NORM = engine.Normalisation(*networks.normalisation("seed_cnn"))
CPU = torch.device("cpu")


def settings(**changes) -> PrivacyParams:
    base = dict(epsilon=8.0, delta=None, max_grad_norm=1.0, epochs=2, batch_size=32, lr=1e-3)
    return PrivacyParams(**(base | changes))


@pytest.fixture(scope="module")
def source() -> sources.LabelledImages:
    return sources.load_source("builtin:digits", SIZE)


def balanced(source: sources.LabelledImages, per_class: int) -> store.Split:
    """The first `per_class` real digits of each class."""
    rows = np.concatenate([np.flatnonzero(source.labels == k)[:per_class] for k in range(10)])
    return store.Split(source.images[rows], source.labels[rows])


@pytest.fixture(scope="module")
def digits(source) -> store.Split:
    return balanced(source, 10)


def private_seed_cnn(digits: store.Split, seed: int, privacy_settings: PrivacyParams):
    """A fresh seed_cnn and its PrivateFit, everything seeded by `seed`."""
    torch.manual_seed(seed)
    model = privacy.dp_compatible(networks.build("seed_cnn", num_classes=10, image_size=SIZE))
    optimizer = torch.optim.Adam(model.parameters(), lr=privacy_settings.lr)
    generator = torch.Generator().manual_seed(seed)
    fit = privacy.make_private(
        model, optimizer, train_size=len(digits), privacy=privacy_settings, generator=generator
    )
    return model, fit, generator


def train(fit: privacy.PrivateFit, digits: store.Split, epochs: int) -> None:
    labels = torch.from_numpy(digits.labels)
    for _ in range(epochs):
        privacy.train_epoch(
            fit, lambda index: engine.to_input(digits.images[index], NORM, CPU), labels
        )


def weights(model: nn.Module) -> list[bytes]:
    return [value.numpy().tobytes() for value in model.state_dict().values()]


def test_a_private_fit_spends_what_the_accountant_counts_and_no_more(digits):
    model, fit, _ = private_seed_cnn(digits, seed=0, privacy_settings=settings())
    before = weights(model)
    train(fit, digits, epochs=2)

    steps = 2 * fit.steps_per_epoch
    independent = RDPAccountant()
    independent.history = [(fit.noise_multiplier, 32 / len(digits), steps)]
    assert fit.delta == pytest.approx(1 / (10 * len(digits)))
    assert fit.epsilon() == pytest.approx(independent.get_epsilon(fit.delta))
    assert 7.5 < fit.epsilon() <= 8.0  # the noise is calibrated to the budget, not beyond it
    assert weights(model) != before  # the wrapped model is the one that learns


def test_two_runs_with_one_seed_write_the_same_weights_and_another_seed_does_not(digits):
    runs = []
    for seed in (3, 3, 4):
        model, fit, _ = private_seed_cnn(digits, seed, settings(epochs=1))
        train(fit, digits, epochs=1)
        runs.append(weights(model))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(digits):
    whole, fit, _ = private_seed_cnn(digits, seed=5, privacy_settings=settings())
    train(fit, digits, epochs=2)

    first, fit, generator = private_seed_cnn(digits, seed=5, privacy_settings=settings())
    train(fit, digits, epochs=1)
    saved = {
        "model": first.state_dict(),
        "optimizer": fit.optimizer.state_dict(),
        "generator": generator.get_state(),
        "private": fit.state_dict(),
    }
    resumed, fit, generator = private_seed_cnn(digits, seed=99, privacy_settings=settings())
    resumed.load_state_dict(saved["model"])
    fit.optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    fit.load_state_dict(saved["private"])
    train(fit, digits, epochs=1)

    assert weights(resumed) == weights(whole)
    assert fit.epsilon() <= 8.0


def test_poisson_batches_vary_in_size_and_an_empty_one_still_steps(source):
    """At one image per batch on average about a third of the batches are empty; each is a
    noise-only step, which the guarantee counts."""
    digits = balanced(source, 4)
    model, fit, _ = private_seed_cnn(digits, seed=0, privacy_settings=settings(batch_size=1))
    sizes = []

    def inputs(index: np.ndarray) -> torch.Tensor:
        sizes.append(len(index))
        return engine.to_input(digits.images[index], NORM, CPU)

    loss, accuracy = privacy.train_epoch(fit, inputs, torch.from_numpy(digits.labels))
    assert 0 in sizes and max(sizes) > 1
    assert np.isfinite(loss) and 0 <= accuracy <= 1
    assert fit.accountant.history[-1][2] == len(sizes) == len(digits)  # every step counted


def test_a_private_head_learns_from_features_and_takes_the_plain_features(source):
    """fit_head on real features (the digits' pixels), with two views per image."""
    digits = balanced(source, 30)
    pixels = torch.from_numpy(digits.images.reshape(len(digits), -1)).float() / 255
    flipped = torch.from_numpy(digits.images[:, :, ::-1].reshape(len(digits), -1).copy()) / 255
    train, val = np.arange(0, 300, 2), np.arange(1, 300, 2)
    views = privacy.by_image(torch.cat([pixels[train], flipped[train].float()]), 2)
    head = nn.Linear(pixels.shape[1], 10)
    result = privacy.fit_head(
        head,
        views,
        digits.labels[train],
        pixels[val],
        digits.labels[val],
        settings(epochs=6, batch_size=50, lr=0.1),
        torch.Generator().manual_seed(0),
    )
    assert views.shape == (150, 2, pixels.shape[1])
    assert torch.equal(views[:, 1], flipped[train].float())
    assert len(result.epsilons) == 6 and result.epsilons == sorted(result.epsilons)
    assert result.epsilons[-1] <= 8.0
    with torch.no_grad():  # the centring is folded into the bias: plain features in
        accuracy = (head(pixels[val]).argmax(1).numpy() == digits.labels[val]).mean()
    assert accuracy == pytest.approx(result.best.val_accuracy)
    assert accuracy > 0.5  # ten classes: chance is 0.1


def test_batch_norm_becomes_group_norm_and_the_model_can_be_rebuilt():
    private = privacy.dp_compatible(networks.build("small_cnn", num_classes=10, image_size=16))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in private.modules())
    rebuilt = privacy.dp_compatible(networks.build("small_cnn", num_classes=10, image_size=16))
    rebuilt.load_state_dict(private.state_dict())  # strict: same architecture
    with pytest.raises(RuntimeError):  # the plain model is another architecture
        networks.build("small_cnn", num_classes=10, image_size=16).load_state_dict(
            private.state_dict()
        )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epsilon": 0}, "epsilon"),
        ({"epsilon": -1}, "epsilon"),
        ({"delta": 1}, "delta"),
        ({"delta": 0}, "delta"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
    ],
)
def test_bad_privacy_params_are_refused(changes, field):
    with pytest.raises(ValidationError) as error:
        settings(**changes)
    assert [e["loc"] for e in error.value.errors()] == [(field,)]


def test_a_delta_not_below_one_over_the_training_images_stops_with_one_line(digits):
    with pytest.raises(UserError) as error:
        private_seed_cnn(digits, seed=0, privacy_settings=settings(delta=1 / len(digits)))
    message = str(error.value)
    assert "\n" not in message and "privacy.delta" in message and "100" in message


def test_a_model_opacus_cannot_fix_stops_with_one_line():
    """timm's batch norm with a built-in activation is not a BatchNorm2d Opacus can replace."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Flatten())
    with pytest.raises(UserError) as error:
        privacy.dp_compatible(model)
    message = str(error.value)
    assert "\n" not in message and "cannot be trained privately" in message
    assert "BatchNormAct2d" in message
