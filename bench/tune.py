"""TPE with pruning against random search without it, through `cnnpipe tune`, on builtin:digits.

    uv run python bench/tune.py                      # 8 trials per arm, 2 side by side
    uv run python bench/tune.py --trials 16 --jobs 1
    uv run python bench/tune.py --recipe default --epochs 15   # small_cnn at 32 px

In a scratch copy of the repository (its own git, DVC and MLflow store): digits with the tiny
preset (or, with `--recipe default`, params.yaml's own recipe), the scratch model trained for
`--epochs` epochs, reproduced once as the baseline and committed. Then two studies over the
same space (train.lr on a log scale from 1e-5, which cannot learn in that many epochs, to 0.1;
train.batch_size), the scratch model's best val accuracy as the value: `tpe` + `median`
pruning, and `random` + no pruning. Each study is one `cnnpipe tune` process; its CPU time is
that of the process and everything it started (getrusage of the waited-for children), its
wall time the process's. Prints a markdown table: best val accuracy, trials pruned, CPU
seconds, wall seconds, per arm.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from repo_copy import REPO, commit, copy_repo

from cnnpipe.params import preset

BIN = Path(sys.executable).parent
SPACE = {
    "train.lr": {"low": 1e-5, "high": 0.1, "log": True},
    "train.batch_size": {"choices": [32, 64, 128]},
}
ARMS = {"tpe + median pruning": ("tpe", "median"), "random, no pruning": ("random", "none")}


def scratch_repo(folder: Path, epochs: int, tiny: bool) -> Path:
    """The repository on digits (with the tiny preset, or params.yaml's own recipe),
    reproduced and committed."""
    repo = copy_repo(folder / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    changes = preset("tiny", REPO / "presets") if tiny else {}
    for key, value in (changes | {"train.epochs": epochs}).items():
        section, leaf = key.split(".")
        params[section][leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(["dvc", "repro", "-q"], cwd=repo, check=True, env=env, stdout=subprocess.DEVNULL)
    commit(repo, "base")
    return repo


def tune(repo: Path, study: str, sampler: str, pruner: str, trials: int, jobs: int) -> dict:
    """One study; its best value, pruned trials, CPU and wall seconds."""
    sets = {
        "tune.sampler": sampler,
        "tune.pruner": pruner,
        "tune.target": "scratch",
        "tune.startup_trials": 3,
        "tune.warmup_epochs": 1,
        "tune.space": SPACE,
    }
    command = [
        str(BIN / "cnnpipe"),
        "tune",
        "--study",
        study,
        "--trials",
        str(trials),
        "--jobs",
        str(jobs),
    ]
    for key, value in sets.items():
        command += [
            "-S",
            f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
            if isinstance(value, dict)
            else f"{key}={value}",
        ]
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=repo, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = optuna.load_study(study_name=study, storage=f"sqlite:///{repo / 'tune.db'}")
    states = [t.state.name for t in found.get_trials()]
    return {"best": found.best_value, "pruned": states.count("PRUNED"), "cpu": cpu, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--recipe",
        choices=("tiny", "default"),
        default="tiny",
        help="tiny: seed_cnn at 16 px (trials are mostly fixed cost); default: params.yaml's",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as folder:
        repo = scratch_repo(Path(folder), args.epochs, args.recipe == "tiny")
        results = {
            arm: tune(repo, f"arm{i}", sampler, pruner, args.trials, args.jobs)
            for i, (arm, (sampler, pruner)) in enumerate(ARMS.items())
        }
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{args.recipe} recipe, {args.trials} trials per arm, {args.jobs} side by side, "
        f"{args.epochs} epochs\n"
    )
    print("| arm | best val accuracy | trials pruned | CPU s | wall s |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        print(f"| {arm} | {r['best']:.4f} | {r['pruned']} | {r['cpu']:.0f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
