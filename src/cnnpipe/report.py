"""`reports/report.md`: the scratch and transfer models side by side, the chosen one and why.

Class names are data: every one reaches the Markdown (and the HTML made from it) through
`markdown_text`, never as markup."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from cnnpipe.store import PrivacySpent

# The headline scores: `reports/evaluate/metrics.json` (dvc exp show), the MLflow runs'
# `test_*` metrics and the report's first table.
HEADLINE = (
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro-F1", "macro_f1", "{:.4f}"),
    ("ROC-AUC", "roc_auc", "{:.4f}"),
    ("expected calibration error", "ece", "{:.4f}"),
    ("membership-inference audit AUC", "audit_auc", "{:.3f}"),
)
NOT_PRIVATE = "not private"
COSTS = (
    ("latency per image (ms), median of repeated runs", "latency_ms", "{:.2f}"),
    ("1-minute load average while timed", "latency_load_average", "{:.2f}"),
    ("parameters", "parameters", "{:,.0f}"),
    ("weights file (MB)", "file_mb", "{:.2f}"),
)


@dataclass
class ModelResult:
    name: str  # scratch | transfer
    architecture: str
    scores: dict  # headline scores, plus per-class precision, recall and support
    costs: dict
    privacy: PrivacySpent | None = None  # the guarantee of a model trained with DP-SGD
    pruned_at_epoch: int | None = None  # a search trial's model, stopped after this epoch
    figures: list[str] = field(default_factory=list)  # file names under reports/figures

    def headline(self) -> dict[str, float | None]:
        """The headline scores; None for one that is undefined on this test split."""
        return {key: self.scores[key] for _, key, _ in HEADLINE}

    def test_metrics(self) -> dict[str, float]:
        """What MLflow records of it: headline scores and costs, as `test_<name>`."""
        values = self.headline() | self.costs
        return {f"test_{k}": v for k, v in values.items() if v is not None}

    def privacy_tags(self) -> dict[str, str]:
        """Its guarantee as registry tags, so that it travels with the registered version."""
        if self.privacy is None:
            return {"epsilon": NOT_PRIVATE}
        return {"epsilon": repr(self.privacy.epsilon), "delta": repr(self.privacy.delta)}

    def guarantee(self) -> str:
        if self.privacy is None:
            return NOT_PRIVATE
        return f"ε = {self.privacy.epsilon:.2f} (δ = {self.privacy.delta:.2g})"


def metrics_file(results: list[ModelResult]) -> dict[str, dict[str, float | None]]:
    """`reports/evaluate/metrics.json`: each headline score for both models, score first, so
    `dvc exp show` puts `accuracy.scratch` and `accuracy.transfer` in its first columns; and
    each model's ε (null: not private); in a pruned search trial, the epoch each pruned model
    stopped after, so that its DVC experiment says so (`dvc exp show`)."""
    scores = {key: {r.name: r.headline()[key] for r in results} for _, key, _ in HEADLINE}
    epsilon = {r.name: r.privacy.epsilon if r.privacy else None for r in results}
    pruned = {r.name: r.pruned_at_epoch for r in results if r.pruned_at_epoch is not None}
    return scores | {"epsilon": epsilon} | ({"pruned_at_epoch": pruned} if pruned else {})


def per_class_rows(results: list[ModelResult]) -> list[dict]:
    """One row per class: its test support, and each model's precision and recall."""
    return [
        {"class": name, "support": support}
        | {
            f"{r.name}_{score}": round(r.scores[score][name], 6)
            for r in results
            for score in ("precision", "recall")
        }
        for name, support in results[0].scores["support"].items()
    ]


def _table(results: list[ModelResult]) -> list[str]:
    lines = ["| | " + " | ".join(f"{r.name} ({r.architecture})" for r in results) + " |"]
    lines.append("|---" * (len(results) + 1) + "|")
    for label, key, fmt in HEADLINE:
        cells = (_shown(fmt, r.scores[key]) for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| privacy budget | " + " | ".join(r.guarantee() for r in results) + " |")
    for label, key, fmt in COSTS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r.costs[key]) for r in results) + " |")
    return lines


PRIVACY_NOTE = (
    "Privacy: ε is the differential-privacy budget the model's training spent (DP-SGD; smaller "
    "is more private: no one can tell from the model, beyond a factor e^ε with probability "
    "1 − δ, whether any one training image was used); *not private* means it was trained "
    "without that guarantee. The membership-inference audit is a loss-threshold attack: its "
    "ROC-AUC at telling training images from as many test images by the model's loss, 0.5 "
    "when the losses give nothing away, 1.0 when they give away every training image."
)


_MARKUP = re.compile("([" + re.escape(string.punctuation) + "])")


def markdown_text(text: str) -> str:
    """`text` as literal Markdown, table cells included: CommonMark lets a backslash escape
    any ASCII punctuation, so every one is escaped (`|`, `<`, `*`, `[`, `&`, ...); leading
    and trailing white space, which Markdown trims, is written as character references."""
    escaped = _MARKUP.sub(r"\\\1", text)
    core = escaped.strip()
    head = escaped[: len(escaped) - len(escaped.lstrip())]
    tail = escaped[len(escaped.rstrip()) :] if core else ""
    return _references(head) + core + _references(tail)


def _references(space: str) -> str:
    return "".join(f"&#{ord(char)};" for char in space)


def _shown(fmt: str, value: float | None) -> str:
    return "n/a" if value is None else fmt.format(value)


def _per_class(results: list[ModelResult]) -> list[str]:
    rows = per_class_rows(results)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        cells = [
            f"{v:.3f}" if isinstance(v, float) else markdown_text(str(v)) for v in row.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def data_line(prepared: dict, test_images: int, data_hash: str) -> str:
    """What the models were measured on, from prepare's report (`reports/prepare.json`)."""
    duplicates = prepared["duplicates"]
    return (
        f"Test split: {test_images} images, data hash `{data_hash[:12]}`. Prepare skipped "
        f"{len(prepared['bad_images'])} unreadable files and found {duplicates['groups']} groups "
        f"of identical images ({duplicates['cross_label_groups']} with different labels, "
        f"{duplicates['groups_across_splits']} across splits)."
    )


def render(
    results: list[ModelResult],
    chosen: ModelResult,
    select_metric: str,
    data: str,
    device: str,
) -> str:
    others = ", ".join(
        f"{r.name} {_shown('{:.4f}', r.scores[select_metric])}" for r in results if r is not chosen
    )
    lines = [
        "# cnnpipe evaluation report",
        "",
        f"{data} Latency measured on {device}, one image per call.",
        "",
        f"**Chosen model: {chosen.name} ({chosen.architecture})** — best test {select_metric} "
        f"({_shown('{:.4f}', chosen.scores[select_metric])}, against {others}); ties go to the "
        "model with fewer parameters.",
        "",
        "The record stage registers it in MLflow and moves the `champion` alias to it when it "
        "beats the current champion on the same test data.",
        "",
        "## Side by side",
        "",
        *_table(results),
        "",
        PRIVACY_NOTE,
        "",
        "## Per class",
        "",
        *_per_class(results),
    ]
    for result in results:
        lines += ["", f"## {result.name} ({result.architecture})", ""]
        lines += [f"![{f}](figures/{f})" for f in result.figures]
    return "\n".join(lines) + "\n"


def summary(results: list[ModelResult], chosen: ModelResult) -> str:
    """What evaluate prints: both test accuracies and the chosen model."""
    scores = ", ".join(f"{r.name} ({r.architecture}) {r.scores['accuracy']:.4f}" for r in results)
    return "\n".join(
        [
            f"test accuracy: {scores}",
            f"chosen: {chosen.name} ({chosen.architecture})",
            "report: reports/report.md (figures in reports/figures/)",
        ]
    )
