"""Membership-inference audit: how much a model's losses give away about its training images.

A loss-threshold attack (Yeom et al., 2018): a model tends to fit the images it trained on
better than images it never saw, so "low loss" guesses "was in the training set". The attack's
ROC-AUC over as many members (training images) as non-members (test images) measures the
leak: 0.5, the losses say nothing about who was in the training set; 1.0, they give every
member away. It is a lower bound on the leak (a stronger attack may find more), and it is
meaningful for every model, private or not; DP-SGD bounds what any attack can achieve.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cnnpipe import networks, store


def losses(logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Each image's training loss, from the logits the model gave it."""
    return networks.loss(logits, torch.from_numpy(labels), reduction="none").numpy()


def balanced_sample(members: int, nonmembers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of equally many members and non-members (the larger group subsampled, seeded):
    the usual setting for membership inference, where an attacker's prior is a coin toss."""
    rng = np.random.default_rng(seed)
    count = min(members, nonmembers)
    return rng.choice(members, count, replace=False), rng.choice(nonmembers, count, replace=False)


def membership_audit(
    predict: Callable[[np.ndarray], torch.Tensor],
    members: store.Split,
    nonmember_losses: np.ndarray,
    seed: int,
) -> float:
    """ROC-AUC of telling `members` from the non-members by the model's loss on each, lower
    loss meaning member, on a balanced sample of both (`balanced_sample`). `predict` gives the
    model's logits for images, in eval mode. The non-members' losses are given (evaluate has
    their logits already); the members' are computed for the sampled images only."""
    chosen_members, chosen_nonmembers = balanced_sample(len(members), len(nonmember_losses), seed)
    chosen_members = np.sort(chosen_members)  # in file order: a memory-mapped split reads forward
    member_losses = losses(predict(members.images[chosen_members]), members.labels[chosen_members])
    return _auc(member_losses, nonmember_losses[chosen_nonmembers])


def _auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    count_members, count_nonmembers = len(member_losses), len(nonmember_losses)
    is_member = np.r_[np.ones(count_members), np.zeros(count_nonmembers)]
    return float(roc_auc_score(is_member, -np.r_[member_losses, nonmember_losses]))
