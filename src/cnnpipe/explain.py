"""Grad-CAM heatmaps: where in an image the model looked for the class it predicted."""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from cnnpipe import engine

# Grad-CAM keeps a pass with gradients alive for every image it explains at once (a transfer
# model at 512 px: about 400 MiB an image; evaluate.gradcam_images allows 64), so it explains
# this many at a time: the default count, in one pass.
GRADCAM_BATCH = 8


class TwoLogits(nn.Module):
    """A one-unit (sigmoid) model seen as two logits, so every class has a target to explain."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit = self.model(images)
        return torch.cat([-logit / 2, logit / 2], dim=1)


def last_conv(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]


def gradcam(
    model: nn.Module, images: np.ndarray, targets: np.ndarray, norm: engine.Normalisation
) -> np.ndarray:
    """Heatmaps in [0, 1] at image resolution (N x H x W) for class `targets` at the model's
    last convolution, by captum's LayerGradCam, `GRADCAM_BATCH` images at a time."""
    model = model.cpu().eval()
    inputs = engine.to_input(images, norm, torch.device("cpu"))
    with torch.no_grad():
        two_class = model(inputs[:1]).shape[1] == 1
    explainer = LayerGradCam(TwoLogits(model) if two_class else model, last_conv(model))
    batches = zip(
        inputs.split(GRADCAM_BATCH), torch.as_tensor(targets).split(GRADCAM_BATCH), strict=True
    )
    # detached at once: an attribution holds its pass's graph, and with it every activation
    cam = torch.cat([explainer.attribute(b, target=t).detach() for b, t in batches])
    cam = LayerAttribution.interpolate(cam, tuple(images.shape[1:3]), "bilinear")
    cam = cam.clamp(min=0)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).numpy()
