"""evaluate: the scratch and transfer models on the test split, side by side, in three steps.

1. measure: each model's scores, costs and pictures on the test split (with `evaluate.tta:
   hflip`, each image's prediction averaged with its mirror image's);
2. choose: the better model by `evaluate.select_metric` (`auto`: macro-F1 when the classes
   are imbalanced, `rules.py`), written to `reports/evaluate/chosen.json` for the record
   stage, which registers it and gates the champion alias (record.py);
3. publish: `reports/evaluate/` (compact metrics for `dvc metrics`, per-class and prediction
   tables for `dvc plots`), `reports/figures/`, `reports/report.md`, and the evaluate run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnpipe import audit, engine, layout, metrics, networks, plots, report, rules, runtime, store
from cnnpipe.errors import UserError
from cnnpipe.params import EvaluateParams, Params
from cnnpipe.recorder import Recorder
from cnnpipe.report import ModelResult

# A model's logits for images (eval mode, in evaluate.batch_size batches).
Predict = Callable[[np.ndarray], torch.Tensor]


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

    def predict(images: np.ndarray) -> torch.Tensor:
        return engine.predict_logits(network, images, model.norm, device, settings.batch_size)

    logits = predict(test.images)
    probabilities = with_tta(networks.probabilities(logits).numpy(), predict, test, settings)
    costs = metrics.size(network, model.target.folder / "weights.pt")
    costs |= metrics.latency(network, test.images, model.norm, device)
    # the membership audit (audit.py): the train split's images (members, un-augmented)
    # against the test split's, as many of each (seeded)
    test_losses = audit.losses(logits, test.labels)
    audit_auc = audit.membership_audit(predict, test.members, test_losses, seed)
    scores = test.score(probabilities) | {"audit_auc": audit_auc}
    meta = model.meta
    result = ModelResult(
        model.target.name, meta.architecture, scores, costs, meta.privacy, meta.pruned_at_epoch
    )
    data_figures = data_pictures(model, test, probabilities, settings) if show_data else {}
    return Measured(
        model, probabilities, result, pictures(model, test, probabilities), data_figures
    )


def with_tta(
    probabilities: np.ndarray, predict: Predict, test: TestSet, settings: EvaluateParams
) -> np.ndarray:
    """`probabilities` of the test images, or with `tta: hflip` their mean with those of the
    mirrored images (`predict`: images -> logits)."""
    if settings.tta == "none":
        return probabilities
    flipped = predict(np.ascontiguousarray(test.images[:, :, ::-1]))
    return (probabilities + networks.probabilities(flipped).numpy()) / 2


def require_memory(model: LoadedModel, images: np.ndarray, batch_size: int, device) -> None:
    """Refuse in one line, before any model is evaluated, a batch size whose forward passes
    over `images` cannot fit in the memory left (by `engine.MEMORY_MARGIN`): a pass needs what
    `engine.inference_bytes_per_image` measures per image times the batch (a transfer model at
    512 px takes about 70 MiB an image: the default batch of 256 needs over 17 GiB)."""
    batch = min(batch_size, len(images))
    available = runtime.available_memory(runtime.Runtime(device))
    if available is None or batch < 4:
        return
    network = model.network.to(device)
    per_image = engine.inference_bytes_per_image(network, model.norm, images.shape[1], device)
    if batch * per_image > available * engine.MEMORY_MARGIN:
        size = getattr(network, "input_size", images.shape[1])
        raise UserError(
            f"evaluating the {model.target.name} model in batches of {batch:,} images at "
            f"{size} px needs about {batch * per_image / 2**30:,.1f} GiB of memory, and "
            f"{runtime.memory_holder(device)} has {available / 2**30:,.1f} GiB free: lower "
            f"evaluate.batch_size well below {available // per_image:,}"
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


def select_metric(settings: EvaluateParams, test: TestSet) -> str:
    """`evaluate.select_metric`, with `auto` resolved by the imbalance rule (rules.py) on the
    train split."""
    if settings.select_metric != "auto":
        return settings.select_metric
    imbalanced = rules.imbalanced(test.members.labels, len(test.classes))
    return "macro_f1" if imbalanced else "accuracy"


def chosen_file(chosen: Measured, metric: str, test: TestSet) -> dict:
    """`reports/evaluate/chosen.json`: the chosen model as the record stage registers it."""
    score = chosen.result.scores[metric]
    return {
        "model": chosen.result.name,
        "architecture": chosen.result.architecture,
        "metric": metric,
        "score": score,
        "test_images": len(test.labels),
        "data_hash": test.data_hash,
        "privacy": chosen.result.privacy_tags(),
    }


def publish(
    measured: list[Measured],
    chosen: Measured,
    metric: str,
    test: TestSet,
    device: str,
    recorder: Recorder,
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
    store.write_json_atomic(layout.CHOSEN, chosen_file(chosen, metric, test))
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
        report.data_line(store.read_json(layout.PREPARE_REPORT), len(test.labels), test.data_hash),
        device,
    )
    store.write_text_atomic(layout.REPORT, text)
    recorder.describe(report.summary(results, chosen.result).replace("\n", "  \n"))
    recorder.log_metrics({f"{r.name}.{k}": v for r in results for k, v in r.test_metrics().items()})
    recorder.log_table(report.per_class_rows(results), "per_class.json")
    recorder.log_report(layout.REPORT, layout.FIGURES)
    for m in measured:
        recorder.log_test_results(
            m.model.target.stage,
            m.result.test_metrics(),
            [layout.FIGURES / name for name in m.result.figures],
        )
    for m in measured:
        for figure in (m.figures | m.data_figures).values():
            plots.close(figure)


def run(params: Params, recorder: Recorder) -> None:
    settings = params.evaluate
    device = runtime.resolve_device("auto")
    test = TestSet.load()
    loaded = [LoadedModel(t, *networks.load_trained(t.folder)) for t in layout.TRAINED]
    for model in loaded:
        require_memory(model, test.images, settings.batch_size, device)
    recorder.log_splits(
        {"test": store.Split(test.images, test.labels)},
        test.classes,
        test.data_hash,
        params.data.source,
    )
    measured = [
        measure(m, test, settings, device, params.tracking.log_images, params.seed) for m in loaded
    ]
    results = [m.result for m in measured]
    metric = select_metric(settings, test)
    chosen = measured[results.index(choose(results, metric))]
    publish(measured, chosen, metric, test, device.type, recorder)
    print(report.summary(results, chosen.result))
