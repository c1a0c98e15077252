"""What the train and transfer stages share: the data they fit on, the trainer around the
loop, and what they publish."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from cnnpipe import engine, models, plots, store, tracking
from cnnpipe.engine import Split, Trainer
from cnnpipe.stages.augment import AUGMENTED
from cnnpipe.stages.prepare import PREPARED


def fit_data() -> tuple[Split, Split, list[str]]:
    """Train on the augmented train split, choose the best epoch on the untouched val split."""
    train = Split(*store.read_split(AUGMENTED, "train"))
    val = Split(*store.read_split(PREPARED, "val"))
    return train, val, store.read_classes(PREPARED)


def input_fingerprints() -> dict[str, str]:
    return {"prepare": store.fingerprint(PREPARED), "augment": store.fingerprint(AUGMENTED)}


def upstream_runs(experiment: str, fingerprints: dict[str, str]) -> dict[str, str | None]:
    return {
        stage: tracking.find_run(experiment, stage, fingerprint)
        for stage, fingerprint in fingerprints.items()
    }


def checkpoint(stage: str, logged_params: dict, fingerprints: dict[str, str]) -> engine.Checkpoint:
    """`checkpoints/<stage>/last.pt`, keyed by the params and input data it was written for."""
    key = json.dumps([logged_params, fingerprints], sort_keys=True, default=str)
    return engine.Checkpoint(
        Path("checkpoints") / stage / "last.pt", hashlib.sha256(key.encode()).hexdigest()
    )


def make_trainer(
    model: nn.Module,
    architecture: str,
    stage_params,
    seed: int,
    runtime: engine.Runtime,
    checkpoint: engine.Checkpoint,
    mlrun: tracking.StageRun,
) -> Trainer:
    train, val, _ = fit_data()
    mean, std = models.normalisation(architecture)
    return Trainer(
        model,
        train,
        val,
        engine.Normalisation(mean, std),
        runtime,
        stage_params.batch_size,
        seed,
        stage_params.epochs,
        checkpoint,
        log_epoch(mlrun),
    )


def log_epoch(mlrun: tracking.StageRun):
    def on_epoch(record: engine.EpochRecord, images_per_second: float) -> None:
        metrics = {k: v for k, v in vars(record).items() if k != "epoch"}
        mlrun.log_metrics(metrics | {"images_per_second": images_per_second}, step=record.epoch)

    return on_epoch


def model_meta(architecture: str, classes: list[str], image_size: int, **extra) -> dict:
    mean, std = models.normalisation(architecture)
    meta = {"architecture": architecture, "classes": classes, "image_size": image_size}
    return meta | extra | {"mean": list(mean), "std": list(std)}


def publish(
    trainer: Trainer, mlrun: tracking.StageRun, model_dir: Path, report_dir: Path, meta: dict
) -> None:
    """Write the best epoch's model folder, the history (DVC plots) and metrics, and log them."""
    if not trainer.runtime.is_main:
        return
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
    mlrun.log_classifier(model_dir, store.read_split(PREPARED, "val")[0][:4].copy())
    print(f"best epoch {best.epoch}: val accuracy {best.val_accuracy:.4f}; wrote {model_dir}")
