"""DP-SGD with Opacus on real digits: the budget, reproducibility, resuming, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from timm.layers import BatchNormAct2d
from torch import nn

from cnnpipe import engine, networks, privacy, sources, store
from cnnpipe.errors import UserError
from cnnpipe.params import PrivacyParams

# DP-SGD's hooks make torch warn at every backward pass; the loop silences that note, and
# nothing else of ours may warn here.
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

SIZE = 16
NORM = engine.Normalisation(*networks.SCRATCH_MEAN_STD)
CPU = torch.device("cpu")
RUNTIME = engine.Runtime(CPU)


def trainer_on(model, digits, batch_size, epochs, checkpoint=None) -> engine.Trainer:
    options = engine.LoopOptions(batch_size)
    inputs = engine.image_inputs((digits, digits), NORM, RUNTIME.device)
    return engine.Trainer(model, *inputs, RUNTIME, options, 0, epochs, checkpoint)


def settings(**changes) -> PrivacyParams:
    base = dict(epsilon=8.0, delta="auto", max_grad_norm=1.0, epochs=2, batch_size=32, lr=1e-3)
    return PrivacyParams(**(base | changes))


@pytest.fixture(scope="module")
def source() -> sources.LabelledImages:
    return sources.load_source("builtin:digits", SIZE)


def balanced(source: sources.LabelledImages, per_class: int, skip: int = 0) -> store.Split:
    """Real digits: `per_class` of each class, after the first `skip` of each."""
    rows = np.concatenate(
        [np.flatnonzero(source.labels == k)[skip : skip + per_class] for k in range(10)]
    )
    return store.Split(source.images[rows], source.labels[rows])


@pytest.fixture(scope="module")
def digits(source) -> store.Split:
    return balanced(source, 10)


def private_seed_cnn(digits: store.Split, seed: int, privacy_settings: PrivacyParams):
    """A fresh seed_cnn and its PrivateFit, everything seeded by `seed`."""
    torch.manual_seed(seed)
    model = networks.build("seed_cnn", num_classes=10, image_size=SIZE, private=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=privacy_settings.lr)
    fit = privacy.make_private(
        model, optimizer, train_size=len(digits), privacy=privacy_settings, seed=seed
    )
    return model, fit


def train(fit: privacy.PrivateFit, digits: store.Split, epochs: int) -> None:
    """Epochs of DP-SGD through the engine's trainer, as the train stage runs them."""
    trainer = trainer_on(fit.network, digits, 32, epochs)
    trainer.run(fit.optimizer.original_optimizer, epochs, private=fit)


def weights(model: nn.Module) -> list[bytes]:
    return [value.numpy().tobytes() for value in model.state_dict().values()]


def test_a_private_fit_spends_what_the_accountant_counts_and_no_more(digits):
    model, fit = private_seed_cnn(digits, seed=0, privacy_settings=settings())
    before = weights(model)
    train(fit, digits, epochs=2)

    steps = 2 * fit.steps_per_epoch
    independent = RDPAccountant()
    independent.history = [(fit.noise_multiplier, 32 / len(digits), steps)]
    assert fit.delta == pytest.approx(1 / (10 * len(digits)))
    assert fit.epsilon() == pytest.approx(independent.get_epsilon(fit.delta, alphas=privacy.ALPHAS))
    assert 7.5 < fit.epsilon() <= 8.0  # the noise is calibrated to the budget, not beyond it
    assert weights(model) != before  # the wrapped model is the one that learns


def test_two_runs_with_one_seed_write_the_same_weights_and_another_seed_does_not(digits):
    runs = []
    for seed in (3, 3, 4):
        model, fit = private_seed_cnn(digits, seed, settings(epochs=1))
        train(fit, digits, epochs=1)
        runs.append(weights(model))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_private_fit_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(
    digits, tmp_path
):
    whole, fit = private_seed_cnn(digits, seed=5, privacy_settings=settings())
    train(fit, digits, epochs=2)

    checkpoint = engine.Checkpoint(tmp_path / "last.pt", key="k")
    for until in (1, 2):  # killed after epoch 1, then started again
        model, fit = private_seed_cnn(digits, seed=5, privacy_settings=settings())
        trainer = trainer_on(model, digits, 32, 2, checkpoint)
        trainer.run(fit.optimizer.original_optimizer, until, private=fit)
    assert [r.epoch for r in trainer.history] == [1, 2]
    assert weights(model) == weights(whole)
    assert fit.epsilon() == pytest.approx(8.0, abs=0.5) and fit.epsilon() <= 8.0


def test_poisson_batches_vary_in_size_and_an_empty_one_still_steps(source):
    """At one image per batch on average about a third of the batches are empty; each is a
    noise-only step, which the guarantee counts."""
    digits = balanced(source, 4)
    model, fit = private_seed_cnn(digits, seed=0, privacy_settings=settings(batch_size=1))
    sizes = [len(index) for index in fit.batches()]
    fit.sampler.generator.manual_seed(int(fit.sampler.generator.initial_seed()))
    trainer = trainer_on(model, digits, 1, 1)
    trainer.run(fit.optimizer.original_optimizer, 1, private=fit)
    assert 0 in sizes and max(sizes) > 1
    record = trainer.history[0]
    assert np.isfinite(record.train_loss) and 0 <= record.train_accuracy <= 1
    assert fit.accountant.history[-1][2] == len(sizes) == len(digits)  # every step counted


def private_head(source, seed: int, epochs: int, checkpoint=None):
    """A linear head on real features (the digits' pixels), two views per image (the image and
    its mirror), trained privately in the loop as the transfer stage trains its head."""
    digits = balanced(source, 30)
    pixels = torch.from_numpy(digits.images.reshape(len(digits), -1)).float() / 255
    flipped = torch.from_numpy(digits.images[:, :, ::-1].reshape(len(digits), -1).copy()) / 255
    train, val = np.arange(0, 300, 2), np.arange(1, 300, 2)
    layout = store.Augmentation(policy_dict={}, on_the_fly=False, originals=150, views=2)
    views = layout.views_by_image(torch.cat([pixels[train], flipped[train].float()]))
    val_inputs = engine.FeatureInputs(pixels[val], digits.labels[val])
    head = privacy.CenteredHead(nn.Linear(pixels.shape[1], 10), val_inputs.features.mean(0))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    plan = settings(epochs=epochs, batch_size=50, lr=0.1)
    fit = privacy.make_private(head, optimizer, train_size=len(train), privacy=plan, seed=seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * fit.steps_per_epoch)
    train_inputs = engine.FeatureInputs(views, digits.labels[train])
    options = engine.LoopOptions(50)
    trainer = engine.Trainer(
        head, train_inputs, val_inputs, RUNTIME, options, 0, epochs, checkpoint
    )
    return head, fit, optimizer, schedule, trainer


def test_a_private_head_learns_from_features_and_takes_the_plain_features(source):
    head, fit, optimizer, schedule, trainer = private_head(source, seed=0, epochs=6)
    logged = []
    trainer.on_epoch = lambda r, s: logged.append(r.epoch)
    trainer.run(optimizer, 6, schedule, private=fit)
    assert trainer.train.features.shape == (150, 2, trainer.val.features.shape[1])
    assert logged == [1, 2, 3, 4, 5, 6] and fit.epsilon() <= 8.0
    linear = trainer.best_model().folded()
    with torch.no_grad():  # the centring is folded into the bias: plain features in
        predicted = linear(trainer.val.features).argmax(1).numpy()
    accuracy = (predicted == trainer.val.labels).mean()
    assert accuracy == pytest.approx(trainer.best.val_accuracy)
    assert accuracy > 0.5  # ten classes: chance is 0.1


def test_a_private_head_resumes_from_its_checkpoint(source, tmp_path):
    whole, fit, optimizer, schedule, trainer = private_head(source, seed=1, epochs=3)
    trainer.run(optimizer, 3, schedule, private=fit)
    checkpoint = engine.Checkpoint(tmp_path / "last.pt", key="k")
    for until in (1, 3):  # killed after epoch 1, then started again
        head, fit, optimizer, schedule, trainer = private_head(source, 1, 3, checkpoint)
        trainer.run(optimizer, until, schedule, private=fit)
    assert [r.epoch for r in trainer.history] == [1, 2, 3]
    assert weights(head) == weights(whole)


def test_private_small_cnn_has_group_norm_and_is_rebuilt_so_from_its_meta(tmp_path):
    plain = networks.build("small_cnn", num_classes=10, image_size=SIZE)
    private = networks.build("small_cnn", num_classes=10, image_size=SIZE, private=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in private.modules())
    privacy.require_compatible(private)
    with pytest.raises(UserError, match="cannot be trained privately") as error:
        privacy.require_compatible(plain)
    assert "\n" not in str(error.value)
    meta = store.ModelMeta(
        architecture="small_cnn",
        classes=[str(k) for k in range(10)],
        image_size=SIZE,
        mean=NORM.mean,
        std=NORM.std,
        best_epoch=1,
        privacy=store.PrivacySpent(epsilon=8.0, delta=1e-5),
    )
    store.write_model_folder(tmp_path / "model", private.state_dict(), meta)
    loaded, read = networks.load_trained(tmp_path / "model")
    assert read.privacy == meta.privacy
    assert weights(loaded) == weights(private)


def test_a_delta_not_below_one_over_the_training_images_stops_with_one_line(digits):
    with pytest.raises(UserError) as error:
        private_seed_cnn(digits, seed=0, privacy_settings=settings(delta=1 / len(digits)))
    message = str(error.value)
    assert "\n" not in message and "privacy.delta = 0.01" in message and "100" in message


def test_a_model_opacus_cannot_train_stops_with_one_line():
    """timm's batch norm with a built-in activation is not a layer Opacus can handle."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Flatten())
    with pytest.raises(UserError) as error:
        privacy.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            train_size=100,
            privacy=settings(),
            seed=0,
        )
    message = str(error.value)
    assert "\n" not in message and "cannot be trained privately" in message
