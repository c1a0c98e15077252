"""The membership-inference audit on real digits: it finds the members of an overfitted model
and finds nothing where there is nothing to find."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnpipe import audit, engine, networks, sources, store

SIZE = 16
NORM = engine.Normalisation(*networks.normalisation("seed_cnn"))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def groups() -> dict[str, store.Split]:
    """Disjoint groups of real digits: 20 to overfit on, and two groups of 200 it never sees."""
    data = sources.load_source("builtin:digits", SIZE)
    order = np.random.default_rng(0).permutation(len(data.labels))
    rows = {"seen": order[:20], "unseen": order[20:220], "other": order[220:420]}
    return {name: store.Split(data.images[r], data.labels[r]) for name, r in rows.items()}


@pytest.fixture(scope="module")
def overfitted(groups) -> torch.nn.Module:
    """seed_cnn trained on 20 images until it has memorised them."""
    torch.manual_seed(0)
    model = networks.build("seed_cnn", num_classes=10, image_size=SIZE)
    seen = groups["seen"]
    trainer = engine.Trainer(model, seen, seen, NORM, engine.Runtime(CPU), 20, 0, 60)
    trainer.run(torch.optim.Adam(model.parameters(), lr=1e-3), 60)
    return model.eval()


def losses(model, split: store.Split) -> np.ndarray:
    return audit.per_image_losses(model, split.images, split.labels, NORM, CPU)


def test_the_audit_finds_the_members_of_an_overfitted_model(overfitted, groups):
    auc = audit.membership_auc(
        losses(overfitted, groups["seen"]), losses(overfitted, groups["other"]), seed=0
    )
    assert auc > 0.75


def test_the_audit_finds_nothing_among_images_the_model_never_saw(overfitted, groups):
    auc = audit.membership_auc(
        losses(overfitted, groups["unseen"]), losses(overfitted, groups["other"]), seed=0
    )
    assert 0.4 < auc < 0.6


def test_per_image_losses_match_the_training_loss_for_both_head_conventions():
    generator = torch.Generator().manual_seed(0)
    for units, labels in ((10, torch.tensor([0, 3, 9])), (1, torch.tensor([0, 1, 1]))):
        logits = torch.randn(3, units, generator=generator)
        each = networks.loss(logits, labels, reduction="none")
        assert each.shape == (3,)
        assert each.mean().item() == pytest.approx(networks.loss(logits, labels).item())


def test_members_and_non_members_are_balanced_and_seeded():
    """500 members against 50 non-members: the AUC uses 50 of each, the same 50 per seed."""
    members, nonmembers = np.linspace(0, 1, 500), np.linspace(0.5, 1.5, 50)
    first = audit.membership_auc(members, nonmembers, seed=1)
    assert first == audit.membership_auc(members, nonmembers, seed=1)
    assert first != audit.membership_auc(members, nonmembers, seed=2)
    assert audit.membership_auc(np.zeros(50), np.ones(50), seed=0) == 1.0
