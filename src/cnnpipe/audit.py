"""Membership-inference audit: how much a model's losses give away about its training images.

A loss-threshold attack (Yeom et al., 2018): a model tends to fit the images it trained on
better than images it never saw, so "low loss" guesses "was in the training set". The attack's
ROC-AUC over as many members (training images) as non-members (test images) measures the
leak: 0.5, the losses say nothing about who was in the training set; 1.0, they give every
member away. It is a lower bound on the leak (a stronger attack may find more), and it is
meaningful for every model, private or not; DP-SGD bounds what any attack can achieve.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from cnnpipe import engine, networks


def per_image_losses(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    norm: engine.Normalisation,
    device: torch.device,
    batch_size: int = 256,
) -> np.ndarray:
    """The training loss of each image (cross-entropy, or binary cross-entropy for a one-unit
    head), in eval mode."""
    logits = engine.predict_logits(model, images, norm, device, batch_size)
    return networks.loss(logits, torch.from_numpy(labels), reduction="none").numpy()


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray, seed: int) -> float:
    """ROC-AUC of telling members from non-members by their loss, lower loss meaning member,
    on equally many of each (the larger group subsampled, seeded): the usual setting for
    membership inference, where an attacker's prior is a coin toss."""
    rng = np.random.default_rng(seed)
    count = min(len(member_losses), len(nonmember_losses))
    members = rng.choice(member_losses, count, replace=False)
    nonmembers = rng.choice(nonmember_losses, count, replace=False)
    is_member = np.r_[np.ones(count), np.zeros(count)]
    return float(roc_auc_score(is_member, -np.r_[members, nonmembers]))
