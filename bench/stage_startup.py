"""The fixed cost of the pipeline's stages: what a user waits for around the training loop.

In a fresh copy of the repository (tracked files, its own MLflow store), this script

1. runs the default pipeline once (`dvc repro`), so every stage has its inputs and train and
   transfer have complete checkpoints;
2. times each stage as a whole process (`cnnpipe <stage>`), `--repeats` times: prepare,
   augment, evaluate and record redo their work; train and transfer find nothing left to fit;
3. times importing each stage module in a fresh interpreter, as the stage process does;
4. times the tiny pipeline end to end (`presets/tiny.yaml`, `dvc repro` from nothing) in a
   second copy;

and prints a table of medians (with the range). Run it on a quiet machine:

    uv run python bench/stage_startup.py            # about 4 minutes on 2 cores
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
from pathlib import Path

import yaml
from repo_copy import copy_repo

BIN = Path(sys.executable).parent
STAGES = ("prepare", "augment", "train", "transfer", "evaluate", "record")
IMPORT_PROBE = "import gc; from cnnpipe import cli; cli.import_stage('{stage}'); gc.freeze()"
TARGETS = {
    "prepare + augment + evaluate": 13.0,
    "a stage with nothing to fit": 5.0,
    "tiny pipeline, dvc repro": 30.0,
}


def environment(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    return env | {"PATH": f"{BIN}{os.pathsep}{env['PATH']}"}


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        command,
        cwd=cwd,
        env=environment(cwd),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def apply_preset(repo: Path, name: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    preset = yaml.safe_load((repo / "presets" / f"{name}.yaml").read_text())
    for section, values in preset.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s  ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per stage (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        default = copy_repo(Path(scratch) / "default")
        first_repro = timed([str(BIN / "dvc"), "repro"], default)
        stages = {s: [] for s in STAGES}
        imports = {s: [] for s in STAGES}
        for _ in range(args.repeats):  # rounds, so that machine noise spreads over all stages
            for stage in STAGES:
                stages[stage].append(timed([str(BIN / "cnnpipe"), stage], default))
                # as `cnnpipe <stage>` imports it (cli.import_stage), and exits after it
                probe = [sys.executable, "-c", IMPORT_PROBE.format(stage=stage)]
                imports[stage].append(timed(probe, default))
        tiny = copy_repo(Path(scratch) / "tiny")
        apply_preset(tiny, "tiny")
        tiny_repro = [timed([str(BIN / "dvc"), "repro"], tiny)]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"default `dvc repro` from nothing (first run, for the inputs): {first_repro:.1f} s\n")
    print(f"{'stage (default params, digits)':34} {'whole process':26} {'import only':26}")
    for stage in STAGES:
        note = " (nothing to fit)" if stage in ("train", "transfer") else ""
        print(f"{stage + note:34} {spread(stages[stage]):26} {spread(imports[stage]):26}")
    medians = {s: statistics.median(v) for s, v in stages.items()}
    totals = {
        "prepare + augment + evaluate": medians["prepare"]
        + medians["augment"]
        + medians["evaluate"],
        "a stage with nothing to fit": max(medians["train"], medians["transfer"]),
        "tiny pipeline, dvc repro": tiny_repro[0],
    }
    print()
    for name, value in totals.items():
        verdict = "met" if value <= TARGETS[name] else "NOT met"
        print(f"{name:34} {value:6.2f} s   target ≤ {TARGETS[name]:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
