"""evaluate: both models on the test split, side by side; the better one is registered and
becomes the `champion` only if it beats the current champion on the same test data.

Writes `reports/evaluate/metrics.json` (for `dvc metrics show/diff`), per-model prediction
tables (confusion matrices for `dvc plots show`), pictures in `reports/figures/` and
`reports/report.md`. Each model's test metrics and pictures also go into its own MLflow run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix

from cnnpipe import engine, explain, metrics, models, plots, report, store, tracking
from cnnpipe.params import EvaluateParams, Params
from cnnpipe.report import ModelResult
from cnnpipe.stages import train, transfer
from cnnpipe.stages.prepare import PREPARED

REPORT_DIR = Path("reports/evaluate")
FIGURES = Path("reports/figures")
REPORT = Path("reports/report.md")
MODEL_RUNS = {"scratch": (train.MODEL_DIR, "train"), "transfer": (transfer.MODEL_DIR, "transfer")}


def aggregate_figures(name, labels, probabilities, classes, title) -> dict[str, Figure]:
    """Pictures of numbers only: safe to publish whatever the data."""
    matrix = confusion_matrix(labels, probabilities.argmax(1), labels=list(range(len(classes))))
    return {
        f"{name}_confusion.png": plots.confusion_matrix(matrix, classes, title),
        f"{name}_reliability.png": plots.reliability_diagram(
            metrics.reliability(labels, probabilities), title
        ),
        f"{name}_roc_pr.png": plots.roc_and_pr_curves(
            metrics.curves(labels, probabilities, classes), title
        ),
    }


def data_figures(name, model, meta, images, labels, probabilities, classes, settings):
    """Pictures that show test images: the worst misclassified ones and Grad-CAM heatmaps."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][
        : settings.misclassified_images
    ]
    figures = {}
    if len(worst):
        captions = [
            f"{classes[labels[i]]}→{classes[predicted[i]]} {probabilities[i, predicted[i]]:.2f}"
            for i in worst
        ]
        figures[f"{name}_misclassified.png"] = plots.labelled_grid(images[worst], captions)
    shown = np.arange(min(settings.gradcam_images, len(labels)))
    if len(shown):
        norm = engine.Normalisation(tuple(meta["mean"]), tuple(meta["std"]))
        heat = explain.gradcam(model, images[shown], predicted[shown], norm)
        captions = [f"{classes[labels[i]]}→{classes[predicted[i]]}" for i in shown]
        figures[f"{name}_gradcam.png"] = plots.labelled_grid(images[shown], captions, heat)
    return figures


def evaluate_model(name, folder, images, labels, classes, device, settings: EvaluateParams):
    model, meta = models.load_trained(folder)
    norm = engine.Normalisation(tuple(meta["mean"]), tuple(meta["std"]))
    probabilities = engine.predict_probabilities(
        model.to(device), images, norm, device, settings.batch_size
    )
    costs = metrics.size(model, folder / "weights.pt") | {
        "latency_ms": metrics.latency_ms_per_image(model, images, norm, device)
    }
    result = ModelResult(
        name, meta["architecture"], metrics.score(labels, probabilities, classes), costs
    )
    return result, model, meta, probabilities


def choose(results: list[ModelResult], metric: str) -> ModelResult:
    """Best by `metric`; on a tie, the smaller model."""
    return max(results, key=lambda r: (r.scores[metric], -r.costs["parameters"]))


def champion_score(registered_model, champion, metric, data_hash, images, labels, classes):
    """The champion's test `metric`: from its tags when measured on this test data, else
    measured now. None when it predicts other classes (then it cannot be compared)."""
    if champion.tags.get("data_hash") == data_hash and f"test_{metric}" in champion.tags:
        return float(champion.tags[f"test_{metric}"])
    classifier = tracking.load_classifier(f"models:/{registered_model}@{tracking.CHAMPION}")
    if classifier.meta["classes"] != classes:
        return None
    probabilities = classifier.predict(None, images)[classes].to_numpy()
    return metrics.score(labels, probabilities, classes)[metric]


def promote(run_id, chosen: ModelResult, params: Params, data_hash, images, labels, classes):
    """Register the chosen model; move `champion` to it only if it beats the champion."""
    name, metric = params.tracking.registered_model, params.evaluate.select_metric
    value = chosen.scores[metric]
    tags = {
        "data_hash": data_hash,
        f"test_{metric}": repr(value),
        "architecture": chosen.architecture,
    }
    version = tracking.register(run_id, name, tags).version
    current = tracking.champion(name)
    if current is None:
        tracking.make_champion(name, version)
        return f"version {version} of `{name}` is the first champion (test {metric} {value:.4f})."
    if current.version == version:
        return f"version {version} of `{name}` (this model) is already the champion."
    held = champion_score(name, current, metric, data_hash, images, labels, classes)
    if held is None:
        return (
            f"version {version} registered; the champion (version {current.version}) "
            "predicts other classes, so it was not compared and keeps the alias."
        )
    if value > held:
        tracking.make_champion(name, version)
        return (
            f"champion moved to version {version}: test {metric} {value:.4f} beats "
            f"version {current.version}'s {held:.4f} on the same test data."
        )
    return (
        f"champion stays version {current.version}: its test {metric} {held:.4f} on the "
        f"same test data is not beaten by version {version}'s {value:.4f}."
    )


def run(params: Params) -> None:
    experiment, settings = params.tracking.experiment, params.evaluate
    device = engine.resolve_device("auto")
    images, labels = store.read_split(PREPARED, "test")
    images = np.asarray(images)
    classes = store.read_classes(PREPARED)
    data_hash = store.fingerprint(PREPARED)
    producing_runs = {
        name: tracking.find_run(experiment, stage, store.fingerprint(folder))
        for name, (folder, stage) in MODEL_RUNS.items()
    }
    logged = tracking.flatten(
        {"evaluate": settings.model_dump(), "tracking": params.tracking.model_dump()}
    )
    with (
        tracking.stage_run(
            "evaluate",
            experiment,
            logged,
            upstream=producing_runs,
            log_images=params.tracking.log_images,
        ) as mlrun,
        store.atomic_dir(FIGURES) as figures_dir,
    ):
        results = []
        for name, (folder, _) in MODEL_RUNS.items():
            result, model, meta, probabilities = evaluate_model(
                name, folder, images, labels, classes, device, settings
            )
            title = f"{name} ({meta['architecture']})"
            pictures = aggregate_figures(name, labels, probabilities, classes, title)
            private = {}
            if params.tracking.log_images:
                private = data_figures(
                    name, model, meta, images, labels, probabilities, classes, settings
                )
            for file_name, figure in (pictures | private).items():
                plots.save(figure, figures_dir / file_name)
                result.figures.append(file_name)
            store.write_csv(
                REPORT_DIR / f"predictions_{name}.csv",
                [
                    {"actual": classes[a], "predicted": classes[p]}
                    for a, p in zip(labels, probabilities.argmax(1), strict=True)
                ],
            )
            test_metrics = {f"test_{k}": v for k, v in tracking.flatten(result.scores).items()}
            test_metrics |= {f"test_{k}": v for k, v in result.costs.items()}
            mlrun.log_metrics({f"{name}.{k}": v for k, v in test_metrics.items()})
            for file_name, figure in pictures.items():
                mlrun.log_figure(figure, file_name)
            for file_name, figure in private.items():
                mlrun.log_data_figure(figure, file_name)
            if producing_runs[name]:
                mlrun.log_to_earlier_run(producing_runs[name], test_metrics, pictures | private)
            for figure in (pictures | private).values():
                plots.close(figure)
            results.append(result)

        chosen = choose(results, settings.select_metric)
        if mlrun.server_lost():
            note = (
                "not registered: the MLflow server was lost during evaluate; once it is "
                "back, run `dvc repro --force evaluate` to register and compare."
            )
        elif producing_runs[chosen.name]:
            with tracking.champion_gate():
                note = promote(
                    producing_runs[chosen.name], chosen, params, data_hash, images, labels, classes
                )
        else:
            note = "not registered: the MLflow run that trained the chosen model was not found."
        text = report.render(
            results, chosen, settings.select_metric, note, len(labels), data_hash, device.type
        )
        store.write_json_atomic(
            REPORT_DIR / "metrics.json",
            {r.name: r.scores | {"parameters": r.costs["parameters"]} for r in results},
        )
        mlrun.log_text(text, "report.md")
        mlrun.log_dict({r.name: r.scores for r in results}, "metrics.json")
        mlrun.log_metrics({"chosen_is_transfer": float(chosen.name == "transfer")})
    store.write_text_atomic(REPORT, text)
    print(text)
