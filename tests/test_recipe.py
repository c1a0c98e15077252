"""Every option of the training recipe changes training when set, and `auto` follows its rule.

Each test trains real networks on real digits for an epoch or two and compares with the same
fit without the option: an option silently ignored would leave the two identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnpipe import engine, fit, networks, rules, runtime, serving, sources, store
from cnnpipe.params import load_params
from conftest import REPO

SIZE = 12
NORM = engine.Normalisation(*networks.SCRATCH_MEAN_STD)
CPU = runtime.Runtime(torch.device("cpu"))
PARAMS = load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def digits() -> tuple[store.Split, store.Split]:
    loaded = sources.load_source("builtin:digits", SIZE)
    order = np.random.default_rng(0).permutation(len(loaded.labels))
    train, val = order[:320], order[320:576]
    return (
        store.Split(loaded.images[train], loaded.labels[train]),
        store.Split(loaded.images[val], loaded.labels[val]),
    )


def trained(data, options: engine.LoopOptions, epochs: int = 1, lr: float = 3e-3, policy=None):
    runtime.make_deterministic(0, True, CPU.device)
    model = networks.build("small_cnn", num_classes=10, image_size=SIZE)
    inputs = engine.image_inputs(data, NORM, CPU.device, policy)
    trainer = engine.Trainer(model, *inputs, CPU, options, 0, epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trainer.run(optimizer, epochs)
    return trainer


def weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in module.state_dict().values() if t.is_floating_point()]


def differ(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(weights(a), weights(b), strict=True))


@pytest.fixture(scope="module")
def plain(digits) -> engine.Trainer:
    return trained(digits, engine.LoopOptions(32))


def test_the_same_options_train_the_same_weights(digits, plain):
    """The baseline of every comparison below is itself reproducible."""
    assert not differ(plain.model, trained(digits, engine.LoopOptions(32)).model)


@pytest.mark.parametrize(
    "option",
    ["label_smoothing", "class_weights", "mixup", "cutmix", "bf16"],
)
def test_each_option_changes_training(digits, plain, option):
    objective = {
        "label_smoothing": engine.Objective(label_smoothing=0.2),
        "class_weights": engine.Objective(class_weights=torch.linspace(0.2, 2.0, 10)),
    }.get(option, engine.Objective())
    mixing = {"mixup": fit.mixing(0.4, 0, 10), "cutmix": fit.mixing(0, 1.0, 10)}.get(option)
    precision = "bf16" if option == "bf16" else "fp32"
    options = engine.LoopOptions(32, objective, mixing, precision=precision)
    assert differ(plain.model, trained(digits, options).model)


def test_augmentation_draws_fresh_views_each_epoch_the_same_on_every_run(digits):
    import albumentations as A

    def policy():
        return A.Compose([A.Affine(translate_percent=(-0.2, 0.2), p=1.0)], seed=0)

    train = digits[0]
    inputs = engine.ImageInputs(train.images, train.labels, NORM, CPU.device, policy(), seed=1)
    again = engine.ImageInputs(train.images, train.labels, NORM, CPU.device, policy(), seed=1)
    rows = np.arange(8)
    first, second = inputs.batch(rows, epoch=1), inputs.batch(rows, epoch=2)
    assert not torch.equal(first, second)  # new views every epoch
    assert torch.equal(first, again.batch(rows, epoch=1))  # and the same on a rerun
    plain = engine.to_input(train.images[rows], NORM, CPU.device)
    assert torch.equal(inputs.batch(rows), plain)  # validation sees the images themselves
    assert differ(
        trained(digits, engine.LoopOptions(32)).model,
        trained(digits, engine.LoopOptions(32), policy=policy()).model,
    )


def test_the_weight_average_is_what_is_validated_and_kept(digits):
    trainer = trained(digits, engine.LoopOptions(32, ema_decay=0.99), epochs=2)
    raw = weights(trainer.model)
    assert differ(trainer.model, trainer.ema.module)  # the average is not the raw model
    kept = trainer.best_model()
    logits = engine.logits_of(kept, trainer.val)
    accuracy = (networks.predicted_classes(logits).numpy() == trainer.val.labels).mean()
    assert trainer.best.val_accuracy == pytest.approx(accuracy)  # what was validated is kept
    assert any(not torch.equal(a, b) for a, b in zip(raw, weights(kept), strict=True))


def test_patience_stops_a_fit_that_no_longer_improves(digits):
    """At a learning rate of zero nothing improves after the first epoch."""
    trainer = trained(digits, engine.LoopOptions(32, patience=2), epochs=6, lr=0.0)
    assert [r.epoch for r in trainer.history] == [1, 2, 3]
    assert "no better val accuracy for 2 epochs" in trainer.stopped
    never = trained(digits, engine.LoopOptions(32), epochs=3, lr=0.0)
    assert len(never.history) == 3 and never.stopped is None


def test_warm_up_then_cosine_decay():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = fit.Phase("fit", 10, None, warmup_epochs=2).schedule(optimizer, steps_per_epoch=5)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(fit.WARMUP_START)
    assert max(rates) == pytest.approx(1.0) and rates.index(max(rates)) == 10
    assert rates[-1] < 0.01 and rates == sorted(rates[:11]) + rates[11:]


def test_a_batch_of_one_image_never_ends_a_training_pass(digits):
    generator = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in engine.batch_indices(65, 32, generator)]
    assert sizes == [32, 33] and sum(sizes) == 65
    for images in (64, 65, 66):  # the schedule is made for the steps the pass takes
        train = store.Split(digits[0].images[:images], digits[0].labels[:images])
        model = networks.build("seed_cnn", num_classes=10, image_size=SIZE)
        inputs = engine.image_inputs((train, digits[1]), NORM, CPU.device)
        trainer = engine.Trainer(model, *inputs, CPU, engine.LoopOptions(32), 0, 1)
        batches = list(engine.batch_indices(images, 32, torch.Generator().manual_seed(0)))
        assert trainer.steps_per_epoch() == len(batches)


def test_imbalance_turns_on_class_weights_and_balanced_scores(digits):
    settings = PARAMS.train
    _, val = digits
    loaded = sources.load_source("builtin:digits", SIZE)
    even = np.concatenate([np.flatnonzero(loaded.labels == k)[:30] for k in range(10)])
    train = store.Split(loaded.images[even], loaded.labels[even])  # 30 of each class
    skewed = np.r_[np.flatnonzero(train.labels != 0), np.flatnonzero(train.labels == 0)[:5]]
    data = fit.FitData(
        store.Split(train.images[skewed], train.labels[skewed]),
        val,
        [str(k) for k in range(10)],
        store.Augmentation(policy_dict={}, on_the_fly=False, originals=len(skewed), views=1),
    )
    assert rules.imbalanced(data.train.labels, 10)
    options = fit.loop_options(settings, data, CPU.device, private=False)
    assert options.objective.class_weights is not None
    assert options.score == "balanced_accuracy"
    weights = options.objective.class_weights
    assert weights[0] == weights.max()  # the rare class weighs most
    private = fit.loop_options(settings, data, CPU.device, private=True)
    assert private.objective.class_weights is None and private.mixing is None
    balanced = fit.FitData(train, val, data.classes, data.augmentation)
    assert fit.loop_options(settings, balanced, CPU.device, False).score == "accuracy"


def test_auto_sizes_follow_their_rules():
    assert rules.working_size([8] * 5) == rules.MIN_SIZE == 28  # digits: upsampled
    assert rules.working_size([28] * 5) == 28  # Fashion-MNIST: its own size
    assert rules.working_size([300, 300, 250]) == rules.MAX_SIZE  # photos: capped
    assert rules.working_size([70, 75, 90]) == 72
    assert rules.working_size([30, 31, 33]) == 28  # a multiple of 4
    assert rules.transfer_input_size(224, 28, 1167) == 56  # digits: twice their size
    assert rules.transfer_input_size(224, 28, 51_000) == 28  # 51k images: no upsampling
    assert rules.transfer_input_size(224, 128, 2000) == 128


def test_auto_precision_is_bf16_only_where_it_is_fast():
    cpu = torch.device("cpu")
    fast = runtime.cpu_has_fast_bf16()
    assert runtime.precision("auto", cpu, True) == ("bf16" if fast else "fp32")
    assert runtime.precision("auto", cpu, False) == "fp32"
    assert runtime.precision("bf16", cpu, False) == "bf16"


def test_a_model_is_scored_on_images_prepared_at_its_own_size(digits, tmp_path):
    """The champion gate's fairness: a 12-px model scored on a 24-px test split (resized back
    to 12 px as prepare would have) scores as on its own split."""
    trainer = trained(digits, engine.LoopOptions(32), epochs=3)
    store.write_model_folder(tmp_path / "model", trainer.best_model().state_dict(), _meta())
    classifier = serving.ImageClassifier(tmp_path / "model")
    loaded = sources.load_source("builtin:digits", 2 * SIZE)
    order = np.random.default_rng(0).permutation(len(loaded.labels))[320:576]
    large = loaded.images[order]
    own = (classifier.probabilities(digits[1].images).argmax(1) == digits[1].labels).mean()
    rescored = classifier.probabilities(serving.at_size(large, classifier)).argmax(1)
    assert abs((rescored == digits[1].labels).mean() - own) < 0.03
    unfair = classifier.probabilities(large).argmax(1)  # 24 px into a 12-px model
    assert (unfair == digits[1].labels).mean() < own - 0.1


def test_flip_tta_averages_each_image_with_its_mirror(digits):
    from cnnpipe import layout
    from cnnpipe.stages import evaluate

    trainer = trained(digits, engine.LoopOptions(32))
    test = digits[1]
    model = evaluate.LoadedModel(layout.SCRATCH, trainer.best_model(), _meta())
    test_set = evaluate.TestSet(test.images, test.labels, [], "", test)
    plain = networks.probabilities(
        engine.predict_logits(model.network, test.images, NORM, CPU.device)
    )
    mirrored = engine.predict_logits(
        model.network, test.images[:, :, ::-1].copy(), NORM, CPU.device
    )
    settings = PARAMS.evaluate.model_copy(update={"tta": "hflip"})

    def predict(images: np.ndarray) -> torch.Tensor:
        return engine.predict_logits(model.network, images, model.norm, CPU.device)

    averaged = evaluate.with_tta(plain.numpy(), predict, test_set, settings)
    expected = (plain + networks.probabilities(mirrored)).numpy() / 2
    np.testing.assert_allclose(averaged, expected, rtol=1e-6)
    assert not np.allclose(averaged, plain.numpy())
    none = PARAMS.evaluate.model_copy(update={"tta": "none"})
    unchanged = evaluate.with_tta(plain.numpy(), predict, test_set, none)
    np.testing.assert_array_equal(unchanged, plain.numpy())


def _meta() -> store.ModelMeta:
    return store.ModelMeta(
        architecture="small_cnn",
        classes=[str(k) for k in range(10)],
        image_size=SIZE,
        mean=NORM.mean,
        std=NORM.std,
        best_epoch=1,
    )


def test_resize_rules_keep_or_cut_the_proportions_of_a_wide_image():
    """A 40 x 20 image, a green edge on the left, then red, then blue: squashed it fills the
    square; padded it keeps its proportions between black bands; cropped to its middle it
    loses the green edge."""
    from cnnpipe import images

    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :8, 1], wide[:, 8:20, 0], wide[:, 20:, 2] = 255, 255, 255
    squashed, padded, cropped = (
        images.from_pixels(wide, 16, resize) for resize in ("squash", "pad", "center_crop")
    )
    assert squashed[8, 0, 1] == 255 and squashed.max(axis=2).min() > 0  # filled: no black
    assert padded[0].max() == 0 and padded[-1].max() == 0  # black bands above and below
    assert padded[8, 0, 1] == 255 and padded[8, -1, 2] == 255
    assert cropped[:, :, 1].max() < 64  # the green edge is cut off
    assert cropped[0].max() == 255 and cropped[8, 0, 0] == 255  # no band: red from the left
