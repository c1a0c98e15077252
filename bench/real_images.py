"""Test accuracy, macro-F1 and wall time of the whole pipeline on real images.

    uv run python bench/real_images.py                                  # both data sets and recipes
    uv run python bench/real_images.py --datasets faces --recipes classic
    uv run python bench/real_images.py --limit 6000 --docs              # 6,000 training images

For each data set (Fashion-MNIST: 60,000 training and its own 10,000 test images, 28x28 grey;
`builtin:faces`: 200 LFW crops) and each recipe (`default`: params.yaml as it is; `classic`:
params.yaml with presets/classic.yaml's overrides, the recipe before on-the-fly augmentation,
the loss and schedule options and the automatic image size), this script copies the
repository (tracked and untracked files, not the ignored ones) into a scratch folder with its
own MLflow store, sets `data.source` and the recipe's overrides in the copy's params.yaml, and
runs the pipeline stage by stage (`dvc repro <stage>`), timing each. The test accuracy and
macro-F1 per model come from the evaluate stage's `reports/evaluate/metrics.json`.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (installed with apt-get if
missing and this runs as root): its files are unpacked into the copy's data/torchvision, where
torchvision finds them and does not download. `--limit N` keeps the first N training images
(the test split stays the full 10,000) for a shorter run.

Prints a markdown table; `--docs` also writes it into docs/benchmarks.md's "Real images"
section, between the markers, with the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from repo_copy import copy_repo

from cnnpipe import params
from cnnpipe.sources import TORCHVISION_ROOT

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_START = "<!-- bench/real_images.py: start -->"
DOCS_END = "<!-- bench/real_images.py: end -->"

DATASETS = {"fashion-mnist": "torchvision:FashionMNIST", "faces": "builtin:faces"}
# A recipe is a preset in presets/ applied over params.yaml; None: params.yaml unchanged.
RECIPES = {"default": None, "classic": "classic"}
# The params.yaml sections a recipe sets, and their keys that are not part of a recipe (where
# and how the pipeline runs). A recipe's preset should set every other key of these sections.
RECIPE_SECTIONS = ("data", "augment", "train", "transfer")
NOT_RECIPE = {"source", "val_fraction", "test_fraction", "on_bad_image", "workers", "device"}
NOT_RECIPE |= {"deterministic", "nproc", "privacy"}
STAGES = ("prepare", "augment", "train", "transfer", "evaluate", "record")
MODEL_STAGES = {"scratch": "train", "transfer": "transfer"}

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {  # torchvision's file name -> whether it belongs to the training part
    "train-images-idx3-ubyte": True,
    "train-labels-idx1-ubyte": True,
    "t10k-images-idx3-ubyte": False,
    "t10k-labels-idx1-ubyte": False,
}


@dataclass
class Outcome:
    dataset: str
    recipe: str
    metrics: dict  # reports/evaluate/metrics.json
    seconds: dict[str, float]  # per stage
    load_average: float  # 1-minute load average when the run started


def set_params(repo: Path, source: str, recipe: str | None) -> None:
    """`data.source` and the recipe's overrides in `repo`'s params.yaml."""
    overrides = {"data.source": source}
    if recipe is not None:
        overrides |= params.preset(recipe, repo / "presets")
    values = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        section = values
        for name in sections:
            section = section[name]
        if key not in section:
            sys.exit(f"{dotted}: no such key in params.yaml: update presets/{recipe}.yaml")
        section[key] = value
    if recipe is not None:
        warn_unset(values, overrides, recipe)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def warn_unset(values: dict, overrides: dict, recipe: str) -> None:
    """Name the recipe keys of params.yaml the preset leaves at their params.yaml value: a
    knob added to params.yaml and not to presets/<recipe>.yaml changes that recipe."""
    unset = [
        f"{section}.{key}"
        for section in RECIPE_SECTIONS
        for key in values[section]
        if key not in NOT_RECIPE and f"{section}.{key}" not in overrides
    ]
    if unset:
        print(f"note: presets/{recipe}.yaml does not set {', '.join(unset)}", flush=True)


def fashion_mnist_files() -> Path:
    """Debian's Fashion-MNIST folder, installing the package if it is missing."""
    if not DEBIAN_FOLDER.is_dir():
        print(f"{DEBIAN_FOLDER} is missing: installing {DEBIAN_PACKAGE} with apt-get", flush=True)
        installed = subprocess.run(["apt-get", "install", "-y", DEBIAN_PACKAGE], check=False)
        if installed.returncode or not DEBIAN_FOLDER.is_dir():
            sys.exit(
                f"Fashion-MNIST not found: run `apt-get update && apt-get install -y "
                f"{DEBIAN_PACKAGE}` (as root), then this script again"
            )
    return DEBIAN_FOLDER


def place_fashion_mnist(repo: Path, limit: int | None) -> None:
    """The Debian files, unpacked, where torchvision looks in `repo` (it then downloads
    nothing); with `limit`, only the first `limit` training images."""
    raw = repo / TORCHVISION_ROOT / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, train_part in IDX_FILES.items():
        data = gzip.decompress((fashion_mnist_files() / f"{name}.gz").read_bytes())
        keep = limit if limit is not None and train_part else None
        (raw / name).write_bytes(data if keep is None else truncated_idx(data, keep))


def truncated_idx(data: bytes, count: int) -> bytes:
    """An IDX file (big-endian header: magic, then one size per dimension) cut to its first
    `count` items."""
    dimensions = data[3]
    sizes = np.frombuffer(data, ">u4", count=dimensions, offset=4).copy()
    item_bytes = int(np.prod(sizes[1:]))
    header = 4 + 4 * dimensions
    sizes[0] = min(count, int(sizes[0]))
    return data[:4] + sizes.astype(">u4").tobytes() + data[header : header + sizes[0] * item_bytes]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    return env | {"PATH": f"{BIN}{os.pathsep}{env['PATH']}"}


def run_pipeline(repo: Path) -> dict[str, float]:
    """`dvc repro <stage>` for each stage in order; the seconds of each."""
    seconds = {}
    for stage in STAGES:
        started = time.perf_counter()
        done = subprocess.run(
            [str(BIN / "dvc"), "repro", stage],
            cwd=repo,
            env=environment(),
            capture_output=True,
            text=True,
        )
        seconds[stage] = time.perf_counter() - started
        if done.returncode:
            sys.exit(
                f"dvc repro {stage} exited with {done.returncode} in {repo} (kept):\n"
                f"--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-2000:]}"
            )
        print(f"  {stage}: {seconds[stage]:.0f} s", flush=True)
    return seconds


def measure(dataset: str, recipe: str, limit: int | None, scratch: Path) -> Outcome:
    repo = copy_repo(scratch / f"{dataset}-{recipe}")
    set_params(repo, DATASETS[dataset], RECIPES[recipe])
    if DATASETS[dataset] == "torchvision:FashionMNIST":
        place_fashion_mnist(repo, limit)
    load = os.getloadavg()[0]
    print(f"{dataset}, {recipe} recipe (load average {load:.2f})", flush=True)
    seconds = run_pipeline(repo)
    metrics = json.loads((repo / "reports" / "evaluate" / "metrics.json").read_text())
    shutil.rmtree(repo)  # a Fashion-MNIST copy holds about a gigabyte of splits and cache
    return Outcome(dataset, recipe, metrics, seconds, load)


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| data set | recipe | model | test accuracy | macro-F1 | model stage | whole pipeline |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for outcome in outcomes:
        total = sum(outcome.seconds.values())
        for model, stage in MODEL_STAGES.items():
            lines.append(
                f"| {outcome.dataset} | {outcome.recipe} | {model} "
                f"| {100 * outcome.metrics['accuracy'][model]:.2f} % "
                f"| {100 * outcome.metrics['macro_f1'][model]:.2f} % "
                f"| {outcome.seconds[stage]:.0f} s | {total:.0f} s |"
            )
    return "\n".join(lines)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    flags = set(re.search(r"flags\s*:\s*(.*)", cpuinfo).group(1).split()) if cpuinfo else set()
    bf16 = ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16"})) or "no bf16 instructions"
    return (
        f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} cores "
        f"({bf16}), {platform.system()}, Python {platform.python_version()}"
    )


def report(outcomes: list[Outcome], command: str) -> str:
    loads = ", ".join(f"{o.dataset}/{o.recipe} {o.load_average:.1f}" for o in outcomes)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Machine: {machine()}. Command: `{command}` ({when}; 1-minute load average at the "
        f"start of each run: {loads}). Model stage: the train or transfer stage, start to "
        "end; whole pipeline: every stage, `dvc repro` included.\n\n" + table(outcomes)
    )


def write_docs(text: str, start_marker: str = DOCS_START, end_marker: str = DOCS_END) -> None:
    """`text` between the markers in docs/benchmarks.md (the rest of the file is kept)."""
    docs = DOCS.read_text()
    start, end = docs.find(start_marker), docs.find(end_marker)
    if start < 0 or end < start:
        sys.exit(f"{DOCS} has no '{start_marker}' ... '{end_marker}' markers: add them first")
    DOCS.write_text(docs[: start + len(start_marker)] + "\n" + text + "\n" + docs[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--limit", type=int, help="Fashion-MNIST: the first N training images")
    parser.add_argument("--docs", action="store_true", help=f"write the table into {DOCS}")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    scratch = Path(tempfile.mkdtemp(prefix="real-images-"))
    outcomes = [
        measure(dataset, recipe, args.limit, scratch)
        for dataset in args.datasets
        for recipe in args.recipes
    ]
    scratch.rmdir()  # each run removes its copy; a failed one is kept for a look
    text = report(outcomes, "uv run python bench/real_images.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.docs:
        write_docs(text)


if __name__ == "__main__":
    main()
