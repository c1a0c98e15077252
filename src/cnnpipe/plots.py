"""Pictures: sample grids, augmentation previews, confusion matrices, learning curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _grid(rows: int, cols: int, cell: float = 1.1) -> tuple[Figure, np.ndarray]:
    figure, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return figure, axes


def samples_per_class(
    images: np.ndarray, labels: np.ndarray, classes: list[str], per_class: int = 6
) -> Figure:
    """A row of the first few images of each class, the class name on the left."""
    figure, axes = _grid(len(classes), per_class)
    for row, name in enumerate(classes):
        for col, index in enumerate(np.flatnonzero(labels == row)[:per_class]):
            axes[row, col].imshow(images[index])
        axes[row, 0].set_title(name, fontsize=8, loc="left")
    figure.tight_layout()
    return figure


def before_after(originals: np.ndarray, augmented: np.ndarray) -> Figure:
    """Top row: original images; bottom rows: their augmented copies."""
    rows = 1 + len(augmented) // len(originals)
    figure, axes = _grid(rows, len(originals))
    for i, image in enumerate(originals):
        axes[0, i].imshow(image)
    for j, image in enumerate(augmented):
        axes[1 + j // len(originals), j % len(originals)].imshow(image)
    axes[0, 0].set_title("original", fontsize=8, loc="left")
    axes[1, 0].set_title("augmented", fontsize=8, loc="left")
    figure.tight_layout()
    return figure


def confusion_matrix(matrix: np.ndarray, classes: list[str], title: str) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay  # only evaluate pays for importing sklearn

    size = max(4.0, 0.45 * len(classes) + 2)
    figure, ax = plt.subplots(figsize=(size, size))
    # rows = actual, columns = predicted, as in reports/evaluate/predictions_*.csv plots
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    figure.tight_layout()
    return figure


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
    loss_ax.legend()
    figure.tight_layout()
    return figure


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
    figure.tight_layout()
    return figure


def roc_and_pr_curves(curves: dict, title: str) -> Figure:
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 4))
    for name, curve in curves.items():
        roc_ax.plot(curve["fpr"], curve["tpr"], label=name)
        pr_ax.plot(curve["recall"], curve["precision"], label=name)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title}")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"precision-recall: {title}")
    pr_ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def labelled_grid(
    images: np.ndarray, captions: list[str], overlays: np.ndarray | None = None, cols: int = 8
) -> Figure:
    """Images with a caption each; `overlays` (N x H x W in [0, 1]) drawn as heatmaps on top."""
    rows = max(1, -(-len(images) // cols))
    figure, axes = _grid(rows, cols, cell=1.5)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        ax = axes.flat[i]
        ax.imshow(image)
        if overlays is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
    figure.tight_layout()
    return figure


def save(figure: Figure, path) -> None:
    figure.savefig(path, dpi=100)
