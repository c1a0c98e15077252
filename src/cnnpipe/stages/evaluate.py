"""evaluate: both models on the test split, side by side.

Writes `reports/evaluate/metrics.json` (for `dvc metrics show/diff`) and per-model prediction
tables (for `dvc plots show`' confusion matrices); the test metrics and a confusion-matrix
picture also go into each model's own MLflow run, so MLflow's compare view lines them up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from cnnpipe import engine, models, plots, store, tracking
from cnnpipe.params import Params
from cnnpipe.stages import train, transfer
from cnnpipe.stages.prepare import PREPARED

REPORT_DIR = Path("reports/evaluate")
MODEL_RUNS = {"scratch": (train.MODEL_DIR, "train"), "transfer": (transfer.MODEL_DIR, "transfer")}


def score(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    predicted = probabilities.argmax(axis=1)
    everyone = list(range(len(classes)))
    precision, recall, _, _ = skm.precision_recall_fscore_support(
        labels, predicted, labels=everyone, zero_division=0
    )
    if len(classes) == 2:
        roc_auc = skm.roc_auc_score(labels, probabilities[:, 1])
    else:
        roc_auc = skm.roc_auc_score(labels, probabilities, multi_class="ovr", labels=everyone)
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "macro_f1": skm.f1_score(labels, predicted, average="macro", labels=everyone),
        "roc_auc": roc_auc,
        "precision": dict(zip(classes, precision.tolist(), strict=True)),
        "recall": dict(zip(classes, recall.tolist(), strict=True)),
    }


def flat_test_metrics(scores: dict) -> dict[str, float]:
    return {f"test_{k}": v for k, v in tracking.flatten(scores).items()}


def comparison_table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in ("accuracy", "macro_f1", "roc_auc"):
        rows.append(f"| {key} | " + " | ".join(f"{results[n][key]:.4f}" for n in names) + " |")
    return "\n".join(rows) + "\n"


def run(params: Params) -> None:
    experiment = params.tracking.experiment
    device = engine.resolve_device("auto")
    images, labels = store.read_split(PREPARED, "test")
    classes = store.read_classes(PREPARED)
    producing_runs = {
        name: tracking.find_run(experiment, stage, store.fingerprint(folder))
        for name, (folder, stage) in MODEL_RUNS.items()
    }
    logged = tracking.flatten({"evaluate": params.evaluate.model_dump()})
    with tracking.stage_run("evaluate", experiment, logged, upstream=producing_runs) as mlrun:
        results, figures = {}, {}
        for name, (folder, _) in MODEL_RUNS.items():
            model, meta = models.load_trained(folder)
            norm = engine.Normalisation(tuple(meta["mean"]), tuple(meta["std"]))
            probabilities = engine.predict_probabilities(
                model.to(device), images, norm, device, params.evaluate.batch_size
            )
            results[name] = score(labels, probabilities, classes)
            predicted = probabilities.argmax(axis=1)
            store.write_csv(
                REPORT_DIR / f"predictions_{name}.csv",
                [
                    {"actual": classes[a], "predicted": classes[p]}
                    for a, p in zip(labels, predicted, strict=True)
                ],
            )
            matrix = skm.confusion_matrix(labels, predicted, labels=list(range(len(classes))))
            title = f"{name} ({meta['architecture']})"
            figures[name] = plots.confusion_matrix(matrix, classes, title)
        store.write_json_atomic(REPORT_DIR / "metrics.json", results)

        for name, scores in results.items():
            mlrun.log_metrics({f"{name}.{k}": v for k, v in flat_test_metrics(scores).items()})
            mlrun.log_figure(figures[name], f"confusion_{name}.png")
            if producing_runs[name]:
                tracking.log_to_run(
                    producing_runs[name],
                    flat_test_metrics(scores),
                    {"confusion_matrix.png": figures[name]},
                )
            plots.close(figures[name])
        table = comparison_table(results)
        mlrun.log_text(table, "comparison.md")
        mlrun.log_dict(results, "metrics.json")
    print(table)
