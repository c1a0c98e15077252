"""`reports/report.md`: scratch and transfer side by side, the chosen model and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelResult:
    name: str  # scratch | transfer
    architecture: str
    scores: dict
    costs: dict
    figures: list[str] = field(default_factory=list)  # file names under reports/figures


ROWS = [
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro-F1", "macro_f1", "{:.4f}"),
    ("ROC-AUC", "roc_auc", "{:.4f}"),
    ("expected calibration error", "ece", "{:.4f}"),
]
COST_ROWS = [
    ("latency per image (ms)", "latency_ms", "{:.2f}"),
    ("parameters", "parameters", "{:,.0f}"),
    ("weights file (MB)", "file_mb", "{:.2f}"),
]


def _table(results: list[ModelResult]) -> list[str]:
    lines = ["| | " + " | ".join(f"{r.name} ({r.architecture})" for r in results) + " |"]
    lines.append("|---" * (len(results) + 1) + "|")
    for label, key, fmt in ROWS:
        lines.append(
            f"| {label} | " + " | ".join(fmt.format(r.scores[key]) for r in results) + " |"
        )
    for label, key, fmt in COST_ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r.costs[key]) for r in results) + " |")
    return lines


def _per_class(results: list[ModelResult]) -> list[str]:
    header = "| class | support | " + " | ".join(
        f"{r.name} precision | {r.name} recall" for r in results
    )
    lines = [header + " |", "|---" * (2 + 2 * len(results)) + "|"]
    for name, support in results[0].scores["support"].items():
        cells = [
            f"{r.scores['precision'][name]:.3f} | {r.scores['recall'][name]:.3f}" for r in results
        ]
        lines.append(f"| {name} | {support} | " + " | ".join(cells) + " |")
    return lines


def render(
    results: list[ModelResult],
    chosen: ModelResult,
    select_metric: str,
    registry_note: str,
    test_images: int,
    data_hash: str,
    device: str,
) -> str:
    others = ", ".join(
        f"{r.name} {r.scores[select_metric]:.4f}" for r in results if r is not chosen
    )
    lines = [
        "# cnnpipe evaluation report",
        "",
        f"Test split: {test_images} images, data hash `{data_hash[:12]}`; latency measured on "
        f"{device}, one image per call.",
        "",
        f"**Chosen model: {chosen.name} ({chosen.architecture})** — best test {select_metric} "
        f"({chosen.scores[select_metric]:.4f}, against {others}); ties go to the model with "
        "fewer parameters.",
        "",
        f"Registry: {registry_note}",
        "",
        "## Side by side",
        "",
        *_table(results),
        "",
        "## Per class",
        "",
        *_per_class(results),
    ]
    for result in results:
        lines += ["", f"## {result.name} ({result.architecture})", ""]
        lines += [f"![{f}](figures/{f})" for f in result.figures]
    return "\n".join(lines) + "\n"
