"""How far the default pipeline's results move from the committed baseline on other x86 hosts,
simulated on this one, and what pinning the CPU kernels would cost.

    uv run python bench/cross_host.py                 # every host below
    uv run python bench/cross_host.py --hosts avx2 avx2-1-thread --docs

The committed `dvc.lock` and `reports/evaluate/metrics.json` come from one CPU. Another CPU
runs other SIMD kernels (torch's `ATEN_CPU_CAPABILITY`, oneDNN's `ONEDNN_MAX_CPU_ISA`), and
where it has no bf16 instructions `precision: auto` trains `small_cnn` in fp32: its models
are other bytes. For each simulated host this script copies the repository (tracked and
untracked files) into a scratch folder, sets that host's kernels in the environment and its
`auto` precision in params.yaml, runs the whole `dvc repro` from scratch and compares:
the models' bytes with the committed lock, and each test accuracy with the committed one,
within `TOLERANCE_POINTS`. It exits with 1 when an accuracy is outside the tolerance.

Prints a markdown table; `--docs` also writes it into docs/benchmarks.md's "Across hosts"
section, between the markers, with the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from real_images import environment, machine, write_docs
from repo_copy import REPO, copy_repo

BIN = Path(sys.executable).parent
DOCS_MARKERS = ("<!-- bench/cross_host.py: start -->", "<!-- bench/cross_host.py: end -->")
# Test accuracy on the built-in digits' 360 test images may move by this many points from
# the committed baseline on another host (1.5 points: 5 images).
TOLERANCE_POINTS = 1.5
PINNED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
FP32 = {"train": {"precision": "fp32"}}  # what `auto` picks on a CPU without bf16


@dataclass(frozen=True)
class Host:
    description: str
    env: dict[str, str]
    params: dict


HOSTS = {
    "this": Host("this CPU (the committed baseline's kind)", {}, {}),
    "avx512": Host(
        "AVX-512 without bf16",
        {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
        FP32,
    ),
    "avx2": Host("AVX2 only", PINNED_AVX2, FP32),
    "avx2-1-thread": Host("AVX2 only, 1 core", PINNED_AVX2 | {"OMP_NUM_THREADS": "1"}, FP32),
}


@dataclass
class Outcome:
    host: str
    accuracy: dict[str, float]
    same_models: dict[str, bool]  # model -> bytes equal to the committed lock's
    kernels: str
    seconds: float


def model_hashes(lock_file: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock_file.read_text())["stages"]
    return {
        Path(out["path"]).name: out["md5"]
        for stage in ("train", "transfer")
        for out in stages[stage]["outs"]
        if out["path"].startswith("models/")
    }


def set_params(repo: Path, overrides: dict) -> None:
    values = yaml.safe_load((repo / "params.yaml").read_text())
    for section, entries in overrides.items():
        values[section].update(entries)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def measure(name: str, scratch: Path) -> Outcome:
    host = HOSTS[name]
    repo = copy_repo(scratch / name)
    set_params(repo, host.params)
    print(f"{host.description} (load average {os.getloadavg()[0]:.2f})", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "dvc"), "repro"],
        cwd=repo,
        env=environment() | host.env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(
            f"dvc repro exited with {done.returncode} in {repo} (kept):\n{done.stderr[-2000:]}"
        )
    accuracy = json.loads((repo / "reports/evaluate/metrics.json").read_text())["accuracy"]
    committed = model_hashes(REPO / "dvc.lock")
    made = model_hashes(repo / "dvc.lock")
    kernels = json.loads((repo / "reports/train/host.json").read_text())["cpu_kernels"]
    shutil.rmtree(repo)
    same = {model: made[model] == committed[model] for model in committed}
    return Outcome(name, accuracy, same, kernels, seconds)


def table(outcomes: list[Outcome], baseline: dict[str, float]) -> str:
    lines = [
        "| simulated host | torch kernels | scratch | transfer | models = committed lock "
        "| whole `dvc repro` |",
        "|---|---|---:|---:|---|---:|",
    ]
    for o in outcomes:
        cells = [
            f"{100 * o.accuracy[m]:.2f} % ({100 * (o.accuracy[m] - baseline[m]):+.2f})"
            for m in ("scratch", "transfer")
        ]
        same = ", ".join(f"{m} {'yes' if s else 'no'}" for m, s in o.same_models.items())
        lines.append(
            f"| {HOSTS[o.host].description} | {o.kernels} | {cells[0]} | {cells[1]} | {same} "
            f"| {o.seconds:.0f} s |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", nargs="+", choices=HOSTS, default=list(HOSTS))
    parser.add_argument("--docs", action="store_true", help="write the table into the docs")
    args = parser.parse_args()
    baseline = json.loads((REPO / "reports/evaluate/metrics.json").read_text())["accuracy"]
    scratch = Path(tempfile.mkdtemp(prefix="cross-host-"))
    outcomes = [measure(name, scratch) for name in args.hosts]
    scratch.rmdir()
    worst = max(abs(o.accuracy[m] - baseline[m]) for o in outcomes for m in baseline) * 100
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "uv run python bench/cross_host.py " + " ".join(sys.argv[1:])
    text = (
        f"Machine: {machine()}. Command: `{command}` ({when}). Committed baseline: scratch "
        f"{100 * baseline['scratch']:.2f} %, transfer {100 * baseline['transfer']:.2f} %; in "
        f"brackets, the points from it. Largest move: {worst:.2f} points (tolerance "
        f"{TOLERANCE_POINTS}).\n\n" + table(outcomes, baseline)
    )
    print(text)
    if args.docs:
        write_docs(text, *DOCS_MARKERS)
    return 1 if worst > TOLERANCE_POINTS else 0


if __name__ == "__main__":
    sys.exit(main())
