import numpy as np
import pytest
import torch

from cnnpipe import engine, models
from cnnpipe.sources import load_source

NORM = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _digits_splits():
    loaded = load_source("builtin:digits", 12)
    order = np.random.default_rng(0).permutation(len(loaded.labels))
    train, val = order[:600], order[600:900]
    return (
        engine.Split(loaded.images[train], loaded.labels[train]),
        engine.Split(loaded.images[val], loaded.labels[val]),
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


def test_trainer_learns_digits_and_keeps_the_best_epoch():
    train, val = _digits_splits()
    engine.seed_everything(0)
    model = models.create_model("seed_cnn", num_classes=10, image_size=12)
    epochs_seen = []
    trainer = engine.Trainer(
        model, train, val, NORM, torch.device("cpu"), batch_size=32, seed=0,
        on_epoch=lambda record, speed: epochs_seen.append((record.epoch, speed > 0)),
    )
    trainer.run(torch.optim.Adam(model.parameters(), lr=3e-3), epochs=4)
    assert epochs_seen == [(1, True), (2, True), (3, True), (4, True)]
    best = trainer.best
    assert best.val_accuracy == max(r.val_accuracy for r in trainer.history)
    assert best.val_accuracy > 0.85
    probabilities = engine.predict_probabilities(trainer.best_model(), val.images, NORM,
                                                 torch.device("cpu"))
    assert (probabilities.argmax(1) == val.labels).mean() == pytest.approx(best.val_accuracy)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
