"""What the train and transfer stages share: the data they fit on and what they publish."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnpipe import engine, plots, store, tracking
from cnnpipe.engine import Split, Trainer
from cnnpipe.stages.augment import AUGMENTED
from cnnpipe.stages.prepare import PREPARED


def fit_data() -> tuple[Split, Split, list[str]]:
    """Train on the augmented train split, choose the best epoch on the untouched val split."""
    train = Split(*store.read_split(AUGMENTED, "train"))
    val = Split(*store.read_split(PREPARED, "val"))
    return train, val, store.read_classes(PREPARED)


def upstream_runs(experiment: str) -> dict[str, str | None]:
    return {
        "prepare": tracking.find_run(experiment, "prepare", store.fingerprint(PREPARED)),
        "augment": tracking.find_run(experiment, "augment", store.fingerprint(AUGMENTED)),
    }


def log_epoch(mlrun: tracking.StageRun):
    def on_epoch(record: engine.EpochRecord, images_per_second: float) -> None:
        metrics = {k: v for k, v in vars(record).items() if k != "epoch"}
        mlrun.log_metrics(metrics | {"images_per_second": images_per_second}, step=record.epoch)

    return on_epoch


def publish(
    trainer: Trainer, mlrun: tracking.StageRun, model_dir: Path, report_dir: Path, meta: dict
) -> None:
    """Write the best epoch's model folder, the history (DVC plots) and metrics, and log them."""
    best = trainer.best
    model = trainer.best_model().cpu()
    store.write_model_folder(model_dir, model.state_dict(), meta | {"best_epoch": best.epoch})
    rows = engine.history_rows(trainer.history)
    store.write_csv(report_dir / "history.csv", rows)
    best_metrics = {f"best_{k}": v for k, v in vars(best).items()}
    store.write_json_atomic(report_dir / "metrics.json", best_metrics)

    mlrun.set_fingerprint(store.fingerprint(model_dir))
    mlrun.log_metrics(best_metrics)
    figure = plots.learning_curves(rows)
    mlrun.log_figure(figure, "learning_curves.png")
    plots.close(figure)
    mlrun.log_artifact(model_dir / "meta.json")
    mlrun.log_classifier(model_dir, np.array(trainer.val.images[:4]))
    print(f"best epoch {best.epoch}: val accuracy {best.val_accuracy:.4f}; wrote {model_dir}")
