"""The pictures the stages save: each is drawn once when saved, into the same pixels as with the
layout engine `tight_layout` leaves behind (which makes `savefig` draw it twice)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.layout_engine import PlaceHolderLayoutEngine

from cnnpipe import metrics, plots

CLASSES = ["zero", "one", "two"]
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 3, 60)
PROBABILITIES = RNG.dirichlet(np.ones(3), 60)
IMAGES = RNG.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
HISTORY = [
    {
        "epoch": e,
        "train_loss": 1 / e,
        "val_loss": 1.2 / e,
        "train_accuracy": 0.5,
        "val_accuracy": 0.4,
    }
    for e in (1, 2, 3)
]

FIGURES = {
    "samples_per_class": lambda: plots.samples_per_class(IMAGES, np.array([0, 1, 2] * 2), CLASSES),
    "before_after": lambda: plots.before_after(IMAGES[:3], IMAGES[3:]),
    "confusion_matrix": lambda: plots.confusion_matrix(
        metrics.confusion(LABELS, PROBABILITIES), CLASSES, "model"
    ),
    "learning_curves": lambda: plots.learning_curves(HISTORY, "model"),
    "reliability_diagram": lambda: plots.reliability_diagram(
        metrics.reliability(LABELS, PROBABILITIES), "model"
    ),
    "roc_and_pr_curves": lambda: plots.roc_and_pr_curves(
        metrics.curves(LABELS, PROBABILITIES, CLASSES), "model"
    ),
    "labelled_grid": lambda: plots.labelled_grid(IMAGES, list("abcdef"), cols=3),
    "labelled_grid with heatmaps": lambda: plots.labelled_grid(
        IMAGES, list("abcdef"), overlays=RNG.random((6, 16, 16)), cols=3
    ),
}


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


@pytest.mark.parametrize("name", FIGURES)
def test_a_saved_figure_is_drawn_once_into_the_same_pixels(name):
    figure = FIGURES[name]()
    draws = []
    figure.canvas.mpl_connect("draw_event", draws.append)
    saved = png(figure)
    assert len(draws) == 1, f"{name}: savefig drew the figure {len(draws)} times"
    figure.set_layout_engine(
        PlaceHolderLayoutEngine(adjust_compatible=True, colorbar_gridspec=True)
    )
    assert png(figure) == saved
    assert len(draws) == 3  # the placeholder engine costs a draw of its own
    plots.close(figure)
