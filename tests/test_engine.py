import subprocess
import sys

import numpy as np
import pytest
import torch

from cnnpipe import engine, fit, layout, networks
from cnnpipe.params import load_params
from cnnpipe.sources import load_source
from cnnpipe.store import Split
from conftest import REPO

NORM = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CPU = engine.Runtime(torch.device("cpu"))


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


def _fit(data, epochs, checkpoint, until=None):
    train, val = data
    engine.make_deterministic(0, True, torch.device("cpu"))
    model = networks.build("small_cnn", num_classes=10, image_size=12)
    trainer = engine.Trainer(model, train, val, NORM, CPU, 64, 0, epochs, checkpoint)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * trainer.steps_per_epoch()
    )
    trainer.run(optimizer, until or epochs, schedule)
    return trainer


def test_resuming_from_a_checkpoint_ends_with_the_same_weights(tmp_path):
    data = _digits_splits(train_images=160)  # small_cnn: batch norm, dropout, one-cycle
    straight = _fit(data, 3, None)
    checkpoint = engine.Checkpoint(tmp_path / "last.pt", key="k")
    _fit(data, 3, checkpoint, until=1)  # stops after epoch 1, as if killed
    resumed = _fit(data, 3, checkpoint)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed.best_state is not None


def test_a_checkpoint_for_other_params_is_set_aside(tmp_path, capsys):
    data = _digits_splits(train_images=64)
    _fit(data, 1, engine.Checkpoint(tmp_path / "last.pt", key="old"))
    trainer = _fit(data, 1, engine.Checkpoint(tmp_path / "last.pt", key="new"))
    assert [r.epoch for r in trainer.history] == [1]
    assert (tmp_path / "set-aside.pt").exists()
    assert "written with other params or data" in capsys.readouterr().err


def test_trainer_learns_digits_and_keeps_the_best_epoch():
    train, val = _digits_splits()
    engine.make_deterministic(0, True, torch.device("cpu"))
    model = networks.build("seed_cnn", num_classes=10, image_size=12)
    epochs_seen = []
    trainer = engine.Trainer(
        model,
        train,
        val,
        NORM,
        CPU,
        batch_size=32,
        seed=0,
        total_epochs=4,
        on_epoch=lambda record, speed: epochs_seen.append((record.epoch, speed > 0)),
    )
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


FAULTS_OF_ONE_STEP = """
import resource, sys
import numpy as np
from cnnpipe import engine
if sys.argv[1] == "keep":
    engine.keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [np.ones(2 << 20, dtype=np.float32) for _ in range(4)]  # 4 x 8 MiB, written
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(min(faults_of_one_step() for _ in range(3)))
"""


def test_freed_activation_buffers_are_reused_without_page_faults():
    """Like a training step: several large buffers alive at once, then all freed. By default
    glibc gives them back to the kernel and the next step faults them in again."""

    def faults(mode: str) -> int:
        command = [sys.executable, "-c", FAULTS_OF_ONE_STEP, mode]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    kept, default = faults("keep"), faults("default")
    assert kept * 10 < default, (kept, default)


def test_the_checkpoint_key_follows_every_param_the_stage_reads_and_its_data():
    params = load_params(REPO / "params.yaml")
    recipe = fit.Recipe(layout.SCRATCH, params.train, build=None, phases=[])
    inputs = {"prepare": "p1", "augment": "a1"}

    def key(changed_params, fingerprints=inputs) -> str:
        logged = layout.stage_params("train", changed_params)
        return fit.checkpoint(recipe, logged, fingerprints).key

    same = key(params)
    assert key(params) == same
    for section, field, value in (("train", "lr", 0.01), ("data", "image_size", 24)):
        changed = params.model_copy(
            update={section: getattr(params, section).model_copy(update={field: value})}
        )
        assert key(changed) != same, field
    assert key(params, inputs | {"augment": "a2"}) != same
    evaluate_only = params.model_copy(
        update={"evaluate": params.evaluate.model_copy(update={"batch_size": 7})}
    )
    assert key(evaluate_only) == same  # train does not read it
