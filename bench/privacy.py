"""Test accuracy against the privacy budget ε on builtin:digits, through the pipeline's stages.

    uv run python bench/privacy.py                       # ε = 1, 3, 8, off; seeds 0, 1, 2
    uv run python bench/privacy.py --scratch-model seed_cnn --epsilons 8 --seeds 0

For each seed, in a scratch folder with the repository's params.yaml (`seed` set, its own
MLflow store): `cnnpipe prepare` and `cnnpipe augment` once, then `cnnpipe train` and
`cnnpipe transfer` once per ε, with `<stage>.privacy.epsilon` set (off: 0, the stage's
ordinary recipe). Every other param is params.yaml's: the private recipes are the stages' own
(`train.privacy`, `transfer.privacy`). Each model folder is then measured as evaluate measures
it: test accuracy, and the membership audit's AUC (train split against test split, seeded).

Prints a markdown table (per model and ε: median test accuracy over the seeds [min, max], the
largest ε spent, the median audit AUC [min, max], the median seconds of the stage) and draws
the medians with their ranges to `--plot` (docs/privacy.png).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cnnpipe import audit, engine, layout, networks, store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPU = torch.device("cpu")
STAGES = {"scratch": "train", "transfer": "transfer"}


@dataclass
class Outcome:
    accuracy: float  # on the test split
    epsilon: float | None  # spent; None: not private
    audit_auc: float
    seconds: float  # the stage process, start to end


def write_params(folder: Path, seed: int, stage: str, changes: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = seed
    params[stage] = params[stage] | {k: v for k, v in changes.items() if k != "privacy"}
    params[stage]["privacy"] |= changes.get("privacy", {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def cnnpipe(stage: str, folder: Path) -> float:
    """Run `cnnpipe <stage>` in `folder`; its seconds."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "cnnpipe"), stage], cwd=folder, env=env, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"cnnpipe {stage} failed in {folder}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def measure(folder: Path, target: layout.TrainedModel, seed: int, seconds: float) -> Outcome:
    """The model folder's test accuracy and audit AUC, as evaluate measures them."""
    model, meta = networks.load_trained(folder / target.folder)
    norm = engine.Normalisation(meta.mean, meta.std)
    test, train = (store.read_split(folder / layout.PREPARED, s) for s in ("test", "train"))
    predicted = engine.predict_probabilities(model, test.images, norm, CPU).argmax(1)

    def predict(images):
        return engine.predict_logits(model, images, norm, CPU)

    test_losses = audit.losses(predict(test.images), test.labels)
    auc = audit.membership_audit(predict, train, test_losses, seed)
    epsilon = meta.privacy.epsilon if meta.privacy else None
    return Outcome(float((predicted == test.labels).mean()), epsilon, auc, seconds)


def run_seed(
    seed: int, epsilons: list[float], scratch_model: str, root: Path
) -> dict[tuple[str, float | None], Outcome]:
    folder = root / f"seed-{seed}"
    folder.mkdir()
    write_params(folder, seed, "train", {})
    for stage in ("prepare", "augment"):
        cnnpipe(stage, folder)
    found = {}
    for name, stage in STAGES.items():
        target = layout.SCRATCH if stage == "train" else layout.TRANSFER
        for epsilon in epsilons:
            changes = {"privacy": {"epsilon": epsilon}}
            if stage == "train":
                changes["model"] = scratch_model
            write_params(folder, seed, stage, changes)
            seconds = cnnpipe(stage, folder)
            found[name, epsilon] = measure(folder, target, seed, seconds)
            print(f"seed {seed} {name} ε {epsilon}: {found[name, epsilon]}", file=sys.stderr)
    return found


def spread(values: list[float], form: str) -> str:
    """The median [min, max]."""
    return (
        f"{form.format(statistics.median(values))} "
        f"[{form.format(min(values))}, {form.format(max(values))}]"
    )


def table(outcomes: dict[str, list[Outcome]], models: dict[str, str]) -> list[str]:
    lines = [
        "| model | ε target | test accuracy, median [min, max] | ε spent (max) "
        "| audit AUC, median [min, max] | s / stage |",
        "|---|---|---|---|---|---|",
    ]
    for (name, epsilon), runs in outcomes.items():
        spent = [o.epsilon for o in runs if o.epsilon is not None]
        cells = [
            f"{name} ({models[name]})",
            "off" if not epsilon else f"{epsilon:g}",
            spread([o.accuracy for o in runs], "{:.1%}"),
            f"{max(spent):.2f}" if spent else "not private",
            spread([o.audit_auc for o in runs], "{:.3f}"),
            f"{statistics.median(o.seconds for o in runs):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(outcomes: dict[str, list[Outcome]], models: dict[str, str], path: Path) -> None:
    """Accuracy against ε, one line per model: medians, min-max bars; `off` at the right."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for offset, (name, architecture) in enumerate(models.items()):
        keys = [key for key in outcomes if key[0] == name]
        labels = ["off" if not e else f"{e:g}" for _, e in keys]
        accuracies = [[o.accuracy * 100 for o in outcomes[key]] for key in keys]
        medians = [statistics.median(a) for a in accuracies]
        low = [m - min(a) for m, a in zip(medians, accuracies, strict=True)]
        high = [max(a) - m for m, a in zip(medians, accuracies, strict=True)]
        x = np.arange(len(keys)) + (offset - 0.5) * 0.08
        axes.errorbar(
            x, medians, yerr=[low, high], marker="o", capsize=3, label=f"{name} ({architecture})"
        )
        axes.set_xticks(np.arange(len(keys)), labels)
    axes.set_xlabel("privacy budget ε (DP-SGD; off: not private)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("builtin:digits: accuracy against ε (median, min-max over seeds)")
    axes.axhline(90, color="grey", linewidth=0.5, linestyle=":")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "off"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scratch-model", default="small_cnn")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "privacy.png")
    args = parser.parse_args()
    epsilons = [0.0 if e == "off" else float(e) for e in args.epsilons]
    transfer_model = yaml.safe_load((REPO / "params.yaml").read_text())["transfer"]["model"]
    models = {"scratch": args.scratch_model, "transfer": transfer_model}
    started = time.perf_counter()
    outcomes: dict = {(name, e): [] for name in STAGES for e in epsilons}
    with tempfile.TemporaryDirectory(prefix="cnnpipe-privacy-") as root:
        for seed in args.seeds:
            for key, outcome in run_seed(seed, epsilons, args.scratch_model, Path(root)).items():
                outcomes[key].append(outcome)
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}; seeds "
        f"{args.seeds}; {time.perf_counter() - started:.0f} s in all; load average after: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    print("\n".join(table(outcomes, models)))
    plot(outcomes, models, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
