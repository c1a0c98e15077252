"""Pictures: sample grids, augmentation previews, confusion matrices, learning curves.

Class names are data: every one reaches matplotlib through `shown`, never as markup."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def shown(text: str) -> str:
    """`text` (a class name, a caption holding one) as matplotlib draws it literally: every
    `$` escaped, since a pair of them would start TeX-like mathtext (which fails on most
    names), and a leading `_` kept visible (legends hide labels that start with one)."""
    literal = text.replace("$", r"\$")
    return "\u200b" + literal if literal.startswith("_") else literal


def _mosaic(cells: list[np.ndarray | None], cols: int, gap: int = 2) -> np.ndarray:
    """Same-sized images (None: an empty cell) tiled row by row on white, `gap` pixels apart.
    One image drawn once is far cheaper than one matplotlib axes per image."""
    shape = next(cell for cell in cells if cell is not None).shape
    height, width = shape[0] + gap, shape[1] + gap
    rows = -(-len(cells) // cols)
    canvas = np.full((rows * height - gap, cols * width - gap, *shape[2:]), np.nan)
    for i, cell in enumerate(cells):
        if cell is not None:
            row, col = divmod(i, cols)
            canvas[row * height : row * height + shape[0], col * width : col * width + shape[1]] = (
                cell
            )
    return canvas


def _laid_out(figure: Figure) -> Figure:
    """`figure` after `tight_layout`, with no layout engine left on it. `tight_layout` leaves a
    placeholder engine behind, and with any engine set, `savefig` draws the whole figure once
    more before rendering it: the same pixels, for a third of its time."""
    figure.tight_layout()
    figure.set_layout_engine(None)
    return figure


def _tiles(
    images: list[np.ndarray | None], cols: int, cell: float, overlays: list | None = None
) -> tuple[Figure, plt.Axes, tuple[int, int]]:
    """A figure showing `images` as a grid; returns it, its axes and one cell's size."""
    rows = -(-len(images) // cols)
    figure, ax = plt.subplots(figsize=(cols * cell, rows * cell))
    pixels = _mosaic(images, cols)
    ax.imshow(np.nan_to_num(pixels, nan=255).astype(np.uint8), interpolation="nearest")
    if overlays is not None:
        ax.imshow(
            _mosaic(overlays, cols),
            cmap="jet",
            alpha=0.45,
            vmin=0,
            vmax=1,
            interpolation="bilinear",
        )
    ax.axis("off")
    shape = next(image for image in images if image is not None).shape
    return figure, ax, (shape[0] + 2, shape[1] + 2)


def samples_per_class(
    images: np.ndarray, labels: np.ndarray, classes: list[str], per_class: int = 6
) -> Figure:
    """A row of the first few images of each class, the class name on the left."""
    cells = []
    for row in range(len(classes)):
        first = [images[i] for i in np.flatnonzero(labels == row)[:per_class]]
        cells += first + [None] * (per_class - len(first))
    figure, ax, (height, _) = _tiles(cells, per_class, cell=1.1)
    for row, name in enumerate(classes):
        ax.text(-2, row * height + height / 2, shown(name), ha="right", va="center", fontsize=8)
    return _laid_out(figure)


def before_after(originals: np.ndarray, augmented: np.ndarray) -> Figure:
    """Top row: original images; rows below: their augmented copies."""
    figure, ax, (height, _) = _tiles([*originals, *augmented], len(originals), cell=1.1)
    for row, name in enumerate(["original", *["augmented"] * (len(augmented) // len(originals))]):
        ax.text(-2, row * height + height / 2, name, ha="right", va="center", fontsize=8)
    return _laid_out(figure)


def confusion_matrix(matrix: np.ndarray, classes: list[str], title: str) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay  # only evaluate pays for importing sklearn

    size = max(4.0, 0.45 * len(classes) + 2)
    figure, ax = plt.subplots(figsize=(size, size))
    # rows = actual, columns = predicted, as in reports/evaluate/predictions_*.csv plots
    labels = [shown(name) for name in classes]
    ConfusionMatrixDisplay(matrix, display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    return _laid_out(figure)


def learning_curves(history: list[dict], title: str) -> Figure:
    """Loss and accuracy per epoch, train and val in their own colours."""
    epochs = [int(row["epoch"]) for row in history]
    figure, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        accuracy_ax.plot(
            epochs, [row[f"{split}_accuracy"] for row in history], marker="o", label=split
        )
    loss_ax.set(title=f"loss: {title}", xlabel="epoch", ylabel="loss")
    accuracy_ax.set(title=f"accuracy: {title}", xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, accuracy_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend()
    return _laid_out(figure)


def close(figure: Figure) -> None:
    plt.close(figure)


def reliability_diagram(bins: dict[str, np.ndarray], title: str) -> Figure:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    figure, ax = plt.subplots(figsize=(4, 4))
    filled = bins["count"] > 0
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.bar(
        bins["confidence"][filled], bins["accuracy"][filled], width=0.08, alpha=0.7, label="model"
    )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8)
    return _laid_out(figure)


def roc_and_pr_curves(curves: dict, title: str) -> Figure:
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 4))
    for name, curve in curves.items():
        roc_ax.plot(curve["fpr"], curve["tpr"], label=shown(name))
        pr_ax.plot(curve["recall"], curve["precision"], label=shown(name))
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title}")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"precision-recall: {title}")
    pr_ax.legend(fontsize=7, ncol=2)
    return _laid_out(figure)


def labelled_grid(
    images: np.ndarray, captions: list[str], overlays: np.ndarray | None = None, cols: int = 8
) -> Figure:
    """Images with a caption each; `overlays` (N x H x W in [0, 1]) drawn as heatmaps on top."""
    cells = list(images)
    figure, ax, (height, width) = _tiles(
        cells, cols, cell=1.5, overlays=None if overlays is None else list(overlays)
    )
    for i, caption in enumerate(captions):
        row, col = divmod(i, cols)
        ax.text(
            col * width + width / 2,
            row * height - 1,
            shown(caption),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    return _laid_out(figure)


def save(figure: Figure, path) -> None:
    figure.savefig(path, dpi=100)
