"""evaluate: the scratch and transfer models on the test split, side by side, in three steps.

1. measure: each model's scores, costs and pictures on the test split;
2. promote: register the better model, and move the `champion` alias to it only if it beats the
   current champion on the same test data (registry.py);
3. publish: `reports/evaluate/` (compact metrics for `dvc metrics`, per-class and prediction
   tables for `dvc plots`), `reports/figures/`, `reports/report.md`, and the evaluate run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnpipe import (
    audit,
    engine,
    layout,
    metrics,
    networks,
    plots,
    registry,
    report,
    serving,
    store,
    tracking,
)
from cnnpipe.params import EvaluateParams, Params
from cnnpipe.report import ModelResult


@dataclass(frozen=True)
class TestSet:
    images: np.ndarray  # uint8, N x H x W x 3, in memory
    labels: np.ndarray  # int64, N
    classes: list[str]
    data_hash: str  # fingerprint of the prepared splits
    members: store.Split  # the prepared train split: the membership audit's members

    @classmethod
    def load(cls) -> TestSet:
        test = store.read_split(layout.PREPARED, "test")
        return cls(
            np.asarray(test.images),
            test.labels,
            store.read_classes(layout.PREPARED),
            store.fingerprint(layout.PREPARED),
            store.read_split(layout.PREPARED, "train"),
        )

    def score(self, probabilities: np.ndarray) -> dict:
        return metrics.score(self.labels, probabilities, self.classes)


@dataclass(frozen=True)
class LoadedModel:
    target: layout.TrainedModel
    network: torch.nn.Module
    meta: store.ModelMeta

    @property
    def norm(self) -> engine.Normalisation:
        return engine.Normalisation(self.meta.mean, self.meta.std)

    @property
    def title(self) -> str:
        return f"{self.target.name} ({self.meta.architecture})"


@dataclass
class Measured:
    model: LoadedModel
    probabilities: np.ndarray
    result: ModelResult
    figures: dict[str, Figure]  # numbers only: safe to publish whatever the data
    data_figures: dict[str, Figure]  # show test images: only with tracking.log_images


def measure(
    model: LoadedModel,
    test: TestSet,
    settings: EvaluateParams,
    device,
    show_data: bool,
    seed: int,
) -> Measured:
    network = model.network.to(device)
    logits = engine.predict_logits(network, test.images, model.norm, device, settings.batch_size)
    probabilities = networks.probabilities(logits).numpy()
    costs = metrics.size(network, model.target.folder / "weights.pt") | {
        "latency_ms": metrics.latency_ms_per_image(network, test.images, model.norm, device)
    }
    # the membership audit (audit.py): the train split's images (members, un-augmented)
    # against the test split's, as many of each (seeded)
    test_losses = audit.losses(logits, test.labels)
    audit_auc = audit.membership_audit(network, test.members, test_losses, model.norm, device, seed)
    scores = test.score(probabilities) | {"audit_auc": audit_auc}
    result = ModelResult(
        model.target.name, model.meta.architecture, scores, costs, model.meta.privacy
    )
    data_figures = data_pictures(model, test, probabilities, settings) if show_data else {}
    return Measured(
        model, probabilities, result, pictures(model, test, probabilities), data_figures
    )


def pictures(model: LoadedModel, test: TestSet, probabilities: np.ndarray) -> dict[str, Figure]:
    name, title = model.target.name, model.title
    return {
        f"{name}_learning_curves.png": plots.learning_curves(
            store.read_csv(model.target.history), title
        ),
        f"{name}_confusion.png": plots.confusion_matrix(
            metrics.confusion(test.labels, probabilities), test.classes, title
        ),
        f"{name}_reliability.png": plots.reliability_diagram(
            metrics.reliability(test.labels, probabilities), title
        ),
        f"{name}_roc_pr.png": plots.roc_and_pr_curves(
            metrics.curves(test.labels, probabilities, test.classes), title
        ),
    }


def data_pictures(
    model: LoadedModel, test: TestSet, probabilities: np.ndarray, settings: EvaluateParams
) -> dict[str, Figure]:
    """Pictures that show test images: the worst misclassified ones and Grad-CAM heatmaps."""
    classes, labels, images = test.classes, test.labels, test.images
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])]
    worst = worst[: settings.misclassified_images]
    figures = {}
    if len(worst):
        captions = [
            f"{classes[labels[i]]}→{classes[predicted[i]]} {probabilities[i, predicted[i]]:.2f}"
            for i in worst
        ]
        figures[f"{model.target.name}_misclassified.png"] = plots.labelled_grid(
            images[worst], captions
        )
    shown = np.arange(min(settings.gradcam_images, len(labels)))
    if len(shown):
        from cnnpipe import explain  # captum takes seconds to import: only when drawing

        heat = explain.gradcam(model.network, images[shown], predicted[shown], model.norm)
        captions = [f"{classes[labels[i]]}→{classes[predicted[i]]}" for i in shown]
        figures[f"{model.target.name}_gradcam.png"] = plots.labelled_grid(
            images[shown], captions, heat
        )
    return figures


def choose(results: list[ModelResult], metric: str) -> ModelResult:
    """Best by `metric`; on a tie, the smaller model. A score that is not a number loses."""

    def rank(result: ModelResult) -> tuple[float, float]:
        score = result.scores[metric]
        return (-np.inf if score is None else score, -result.costs["parameters"])

    return max(results, key=rank)


def promote(chosen: Measured, test: TestSet, params: Params, producing_run: str | None) -> str:
    """Register the chosen model and gate the champion alias; the report's registry line."""
    if producing_run is None:
        return "not registered: the MLflow run that trained the chosen model was not found."
    metric = params.evaluate.select_metric
    if chosen.result.scores[metric] is None:
        return f"not registered: test {metric} is undefined on this test split."
    candidate = registry.Candidate(
        run_id=producing_run,
        metric=metric,
        score=chosen.result.scores[metric],
        data_hash=test.data_hash,
        tags={"architecture": chosen.result.architecture, "model": chosen.result.name}
        | chosen.result.privacy_tags(),
        description=f"{chosen.model.title}: test {metric} {chosen.result.scores[metric]:.4f} "
        f"on {len(test.labels)} images (data hash {test.data_hash[:12]}).",
    )

    def score_champion(version) -> float | None:
        classifier = serving.load(f"models:/{params.tracking.registered_model}/{version.version}")
        if classifier.meta.classes != test.classes:
            return None
        return test.score(classifier.probabilities(test.images))[metric]

    return registry.promote(params.tracking.registered_model, candidate, score_champion)


def publish(
    measured: list[Measured],
    chosen: Measured,
    metric: str,
    note: str,
    test: TestSet,
    device: str,
    mlrun: tracking.StageRun,
    producing: dict[str, str | None],
) -> None:
    """Write every output of the stage and log it to the evaluate run (and, the first time a
    model is evaluated, to the run that trained it)."""
    results = [m.result for m in measured]
    with store.atomic_dir(layout.FIGURES) as figures_dir:
        for m in measured:
            for file_name, figure in (m.figures | m.data_figures).items():
                plots.save(figure, figures_dir / file_name)
                m.result.figures.append(file_name)
    store.write_json_atomic(layout.EVALUATION / "metrics.json", report.metrics_file(results))
    store.write_csv(layout.EVALUATION / "per_class.csv", report.per_class_rows(results))
    for m in measured:
        predicted = m.probabilities.argmax(1)
        store.write_csv(
            layout.EVALUATION / f"predictions_{m.result.name}.csv",
            [
                {"actual": test.classes[a], "predicted": test.classes[p]}
                for a, p in zip(test.labels, predicted, strict=True)
            ],
        )
    text = report.render(
        results,
        chosen.result,
        metric,
        note,
        report.data_line(store.read_json(layout.PREPARE_REPORT), len(test.labels), test.data_hash),
        device,
    )
    store.write_text_atomic(layout.REPORT, text)
    mlrun.set_fingerprint(store.fingerprint(*layout.EVALUATED))
    mlrun.describe(report.summary(results, chosen.result, note).replace("\n", "  \n"))

    mlrun.log_metrics({f"{r.name}.{k}": v for r in results for k, v in r.test_metrics().items()})
    mlrun.log_table(report.per_class_rows(results), "per_class.json")
    mlrun.log_report(layout.REPORT, layout.FIGURES)
    for m in measured:
        mlrun.log_results_once(
            producing[m.model.target.stage],
            m.result.test_metrics(),
            [layout.FIGURES / name for name in m.result.figures],
        )
    for m in measured:
        for figure in (m.figures | m.data_figures).values():
            plots.close(figure)


def run(params: Params) -> None:
    settings, experiment = params.evaluate, params.tracking.experiment
    device = engine.resolve_device("auto")
    test = TestSet.load()
    loaded = [LoadedModel(t, *networks.load_trained(t.folder)) for t in layout.TRAINED]
    producing = tracking.find_runs(
        experiment, {t.stage: store.fingerprint(t.folder) for t in layout.TRAINED}
    )
    logged = layout.stage_params("evaluate", params)
    with tracking.stage_run(
        "evaluate", experiment, logged, upstream=producing, log_images=params.tracking.log_images
    ) as mlrun:
        mlrun.log_splits(
            {"test": store.Split(test.images, test.labels)},
            test.classes,
            test.data_hash,
            params.data.source,
        )
        measured = [
            measure(m, test, settings, device, params.tracking.log_images, params.seed)
            for m in loaded
        ]
        results = [m.result for m in measured]
        chosen = measured[results.index(choose(results, settings.select_metric))]
        if mlrun.server_lost():
            note = (
                "not registered: the MLflow server was lost during evaluate; once it is "
                "back, run `dvc repro --force evaluate` to register and compare."
            )
        else:
            note = promote(chosen, test, params, producing[chosen.model.target.stage])
        publish(measured, chosen, settings.select_metric, note, test, device.type, mlrun, producing)
    print(report.summary(results, chosen.result, note))
