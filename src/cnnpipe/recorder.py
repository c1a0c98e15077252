"""What a stage records of itself, as the stage sees it: an interface, no implementation.

The stage runner (`cli.py`) opens each stage's MLflow run and hands the stage a `Recorder`
(`tracking.StageRun`): stages never import MLflow, so editing how a run is logged changes no
stage's code deps and retrains nothing. Pictures that show data (samples, augmentation
previews, the logged model's input example) go through methods of their own, behind which the
recorder enforces `tracking.log_images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from cnnpipe.layout import TrainedModel
    from cnnpipe.store import Split


class Recorder(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Values in one batch; `step` is the epoch."""

    def log_epoch(self, record: dict[str, float], images_per_second: float) -> None:
        """One epoch's losses and scores (its `epoch` entry is the step)."""

    def log_dict(self, payload: object, artifact_file: str) -> None: ...

    def log_table(self, rows: list[dict], artifact_file: str) -> None: ...

    def describe(self, text: str) -> None:
        """The run's description (Markdown)."""

    def log_splits(
        self, splits: dict[str, Split], classes: list[str], data_hash: str, source: str
    ) -> None:
        """The splits the stage read, by context (train, val, test), as MLflow datasets."""

    def log_samples(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        """A few images of each class (a picture of data)."""

    def log_augmentation_preview(self, originals: np.ndarray, augmented: np.ndarray) -> None:
        """Images before and after augmentation (a picture of data)."""

    def log_learning_curves(self, history: list[dict], title: str) -> None: ...

    def log_model(self, target: TrainedModel, examples: np.ndarray) -> None:
        """The model folder as an MLflow model; `examples` (images) become its input example
        only when pictures of data may be logged."""

    def log_report(self, report: Path, figures: Path) -> None:
        """The Markdown report with its figures folder."""

    def log_test_results(self, stage: str, metrics: dict[str, float], figures: list[Path]) -> None:
        """Test results for the run of `stage` (an upstream run) that trained the model."""
