import numpy as np
import pytest
import torch

from cnnpipe import engine, fit, layout, networks, runtime
from cnnpipe.errors import UserError
from cnnpipe.params import load_params
from cnnpipe.sources import load_source
from cnnpipe.store import Split
from conftest import REPO

NORM = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CPU = runtime.Runtime(torch.device("cpu"))


def _digits_splits(train_images: int = 600):
    loaded = load_source("builtin:digits", 12)
    order = np.random.default_rng(0).permutation(len(loaded.labels))
    train, val = order[:train_images], order[train_images : train_images + 256]
    return (
        Split(loaded.images[train], loaded.labels[train]),
        Split(loaded.images[val], loaded.labels[val]),
    )


def test_to_input_normalises_into_channels_last():
    batch = np.full((2, 5, 5, 3), 255, dtype=np.uint8)
    tensor = engine.to_input(batch, NORM, torch.device("cpu"))
    assert tensor.shape == (2, 3, 5, 5)
    assert tensor.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tensor, torch.ones_like(tensor))


def test_batches_cover_every_index_once():
    generator = torch.Generator().manual_seed(0)
    seen = np.concatenate(list(engine.batch_indices(103, 10, generator)))
    assert sorted(seen.tolist()) == list(range(103))


def test_ranks_get_disjoint_equal_shards_of_one_permutation():
    shards = [
        np.concatenate(list(engine.batch_indices(103, 8, torch.Generator().manual_seed(1), r, 2)))
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0]) & set(shards[1])


def _fit(data, epochs, checkpoint, until=None, options=None, policy=None):
    runtime.make_deterministic(0, True, torch.device("cpu"))
    model = networks.build("small_cnn", num_classes=10, image_size=12)
    options = options or engine.LoopOptions(64)
    inputs = engine.image_inputs(data, NORM, CPU.device, policy)
    trainer = engine.Trainer(model, *inputs, CPU, options, 0, epochs, checkpoint)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    phase = fit.Phase("fit", epochs, optimizer=None, warmup_epochs=1)
    trainer.run(optimizer, until or epochs, phase.schedule(optimizer, trainer.steps_per_epoch()))
    return trainer


def test_resuming_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    """small_cnn (batch norm, dropout), warm-up and cosine, every option of the loop on:
    fresh augmentation per epoch, mixup / cutmix, EMA, smoothing and class weights."""
    data = _digits_splits(train_images=160)
    options = engine.LoopOptions(
        64,
        engine.Objective(0.1, torch.linspace(0.5, 1.5, 10)),
        fit.mixing(0.2, 1.0, 10),
        ema_decay=0.9,
    )
    policy = _policy()
    straight = _fit(data, 3, None, options=options, policy=policy)
    checkpoint = engine.Checkpoint(tmp_path / "last.pt", key="k")
    _fit(data, 3, checkpoint, until=1, options=options, policy=_policy())  # killed after 1
    resumed = _fit(data, 3, checkpoint, options=options, policy=_policy())
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed.best_state is not None


def test_a_checkpoint_for_other_params_is_set_aside(tmp_path, capsys):
    data = _digits_splits(train_images=64)
    _fit(data, 1, engine.Checkpoint(tmp_path / "last.pt", key="old"))
    trainer = _fit(data, 1, engine.Checkpoint(tmp_path / "last.pt", key="new"))
    assert [r.epoch for r in trainer.history] == [1]
    assert engine.Checkpoint(tmp_path / "last.pt", key="new").set_aside_path.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "last.pt"]  # the checkpoint folder: clean
    assert "written with other params or data" in capsys.readouterr().err


def _policy():
    import albumentations as A

    return A.Compose([A.Affine(translate_percent=(-0.1, 0.1), p=0.5)], seed=0)


def test_trainer_learns_digits_and_keeps_the_best_epoch():
    train, val = _digits_splits()
    runtime.make_deterministic(0, True, torch.device("cpu"))
    model = networks.build("seed_cnn", num_classes=10, image_size=12)
    epochs_seen = []
    inputs = engine.image_inputs((train, val), NORM, CPU.device)
    trainer = engine.Trainer(model, *inputs, CPU, engine.LoopOptions(32), seed=0, total_epochs=4)
    trainer.on_epoch = lambda record, speed: epochs_seen.append((record.epoch, speed > 0))
    trainer.run(torch.optim.Adam(model.parameters(), lr=3e-3), until_epoch=4)
    assert epochs_seen == [(1, True), (2, True), (3, True), (4, True)]
    best = trainer.best
    assert best.val_accuracy == max(r.val_accuracy for r in trainer.history)
    assert best.val_accuracy > 0.85
    probabilities = engine.predict_probabilities(
        trainer.best_model(), val.images, NORM, torch.device("cpu")
    )
    assert (probabilities.argmax(1) == val.labels).mean() == pytest.approx(best.val_accuracy)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)


def test_the_checkpoint_key_follows_every_param_the_stage_reads_and_its_data():
    params = load_params(REPO / "params.yaml")
    recipe = fit.Recipe(layout.SCRATCH, params.train, build=None, phases=[])
    inputs = {"prepare": "p1", "augment": "a1"}

    def key(changed_params, fingerprints=inputs) -> str:
        logged = layout.stage_params("train", changed_params)
        return fit.checkpoint(recipe, logged, fingerprints).key

    same = key(params)
    assert key(params) == same
    for section, field, value in (("train", "lr", 0.01), ("data", "source", "builtin:faces")):
        changed = params.model_copy(
            update={section: getattr(params, section).model_copy(update={field: value})}
        )
        assert key(changed) != same, field
    assert key(params, inputs | {"augment": "a2"}) != same
    evaluate_only = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"batch_size": 7})}
    )
    assert key(evaluate_only) == same  # train does not read it


@pytest.mark.parametrize(
    ("environment", "processes"),
    [
        ({}, 1),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, 1),  # torchrun, one process
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
          "MASTER_PORT": "29500"}, 2),
        ({"WORLD_SIZE": "2"}, None),  # left over from another launcher
        ({"WORLD_SIZE": "2", "RANK": "abc", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
          "MASTER_PORT": "1"}, None),
        ({"RANK": "3"}, None),
    ],
)  # fmt: skip
def test_a_process_group_is_read_from_what_torchrun_sets_or_refused_in_one_line(
    monkeypatch, environment, processes
):
    for name in runtime.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if processes is None:
        with pytest.raises(UserError, match="describes no process group torchrun started"):
            runtime.launched_world_size()
    else:
        assert runtime.launched_world_size() == processes


def test_measuring_what_a_step_keeps_changes_nothing_a_fit_computes_and_scales_with_pixels():
    """The memory check runs a training step of a network with dropout on real digits: its
    batch-norm statistics, mode and gradients and the random streams (dropout) are as before,
    and the bytes a step takes per image grow with the input size (4x the pixels: over 3x)."""
    train, _ = _digits_splits(8)
    inputs = engine.ImageInputs(train.images, train.labels, NORM, torch.device("cpu"))
    kept = {}
    for size in (32, 64):
        model = networks.build("mobilenet_v3_small", num_classes=10, image_size=12, input_size=size)
        model.eval()
        buffers = {name: value.clone() for name, value in model.state_dict().items()}
        torch.manual_seed(0)
        kept[size] = engine.step_bytes_per_image(model, inputs)
        drawn = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(drawn, torch.rand(3))
        assert not model.training
        assert all(weight.grad is None for weight in model.parameters())
        for name, value in model.state_dict().items():
            assert torch.equal(value, buffers[name]), name
    assert kept[32] > 0 and kept[64] > 3 * kept[32], kept
