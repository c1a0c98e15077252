"""The membership-inference audit on real digits: it finds the members of an overfitted model
and finds nothing where there is nothing to find."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

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
    options = engine.LoopOptions(20)
    inputs = engine.image_inputs((seen, seen), NORM, CPU)
    trainer = engine.Trainer(model, *inputs, engine.Runtime(CPU), options, 0, 60)
    trainer.run(torch.optim.Adam(model.parameters(), lr=1e-3), 60)
    return model.eval()


def predictor(model: torch.nn.Module):
    return lambda images: engine.predict_logits(model, images, NORM, CPU)


def losses(model: torch.nn.Module, split: store.Split) -> np.ndarray:
    return audit.losses(predictor(model)(split.images), split.labels)


def test_the_audit_finds_the_members_of_an_overfitted_model(overfitted, groups):
    others = losses(overfitted, groups["other"])
    auc = audit.membership_audit(predictor(overfitted), groups["seen"], others, seed=0)
    assert auc > 0.75


def test_the_audit_finds_nothing_among_images_the_model_never_saw(overfitted, groups):
    others = losses(overfitted, groups["other"])
    auc = audit.membership_audit(predictor(overfitted), groups["unseen"], others, seed=0)
    assert 0.4 < auc < 0.6


def test_the_audit_scores_the_balanced_sample_it_draws(overfitted, groups):
    """The AUC of the sampled images' losses, computed here from every image's loss."""
    members, nonmembers = groups["unseen"], groups["seen"]
    chosen_members, chosen_nonmembers = audit.balanced_sample(len(members), len(nonmembers), 3)
    nonmember_losses = losses(overfitted, nonmembers)
    member_losses = losses(overfitted, members)[chosen_members]
    is_member = np.r_[np.ones(20), np.zeros(20)]
    expected = roc_auc_score(is_member, -np.r_[member_losses, nonmember_losses[chosen_nonmembers]])
    found = audit.membership_audit(predictor(overfitted), members, nonmember_losses, seed=3)
    assert found == pytest.approx(expected)
    assert found < 0.25  # the 20 members are the unseen images: the seen ones look like members


def test_per_image_losses_match_the_training_loss_for_both_head_conventions():
    generator = torch.Generator().manual_seed(0)
    for units, labels in ((10, torch.tensor([0, 3, 9])), (1, torch.tensor([0, 1, 1]))):
        logits = torch.randn(3, units, generator=generator)
        each = networks.loss(logits, labels, reduction="none")
        assert each.shape == (3,)
        assert each.mean().item() == pytest.approx(networks.loss(logits, labels).item())


def test_members_and_non_members_are_balanced_and_seeded():
    """500 members against 50 non-members: the audit uses 50 of each, the same 50 per seed."""
    members, nonmembers = audit.balanced_sample(500, 50, seed=1)
    assert len(members) == len(set(members)) == 50 and members.max() < 500
    assert sorted(nonmembers) == list(range(50))
    again, _ = audit.balanced_sample(500, 50, seed=1)
    other, _ = audit.balanced_sample(500, 50, seed=2)
    assert list(again) == list(members) and list(other) != list(members)
