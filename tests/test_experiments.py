"""Experiments queued and run in parallel (`dvc queue start -j 2`): each finishes, shows in
`dvc exp show` with its metrics, and lands in the repository's SQLite MLflow store, tagged with
its DVC experiment name."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from shell import run

pytestmark = pytest.mark.e2e

EVALUATE_METRICS = "reports/evaluate/metrics.json"


def wait_for_queue(repo: Path, timeout_s: float = 600) -> str:
    """`dvc queue status` once nothing is queued or running; on timeout, fail with the
    status and the queue workers' logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], repo, timeout_s=120).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        if time.monotonic() > deadline:
            logs = sorted((repo / ".dvc" / "tmp" / "exps").rglob("*.out"))
            raise AssertionError(
                "\n".join([status, *(f"{p}:\n{p.read_text()[-3000:]}" for p in logs)])
            )
        time.sleep(3)


def experiments(shown: object) -> dict[str, dict]:
    """Experiment name -> its `data` (params, metrics), from `dvc exp show --json`."""
    found = {}
    if isinstance(shown, dict):
        for exp in shown.get("experiments") or []:
            for rev in exp["revs"]:
                found[rev["name"]] = rev["data"]
        shown = list(shown.values())
    if isinstance(shown, list):
        for item in shown:
            found |= experiments(item)
    return found


def test_two_queued_experiments_run_in_parallel_and_both_land_in_mlflow(faces_repo):
    # From the committed baseline the experiments rerun train and evaluate; it has no MLflow
    # store, so both experiments create it at once.
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.001,0.01"], faces_repo)
    try:
        run(["dvc", "queue", "start", "-j", "2"], faces_repo)
        status = wait_for_queue(faces_repo)
    finally:
        run(["dvc", "queue", "stop", "--kill"], faces_repo, expect=None, timeout_s=120)
    assert status.count("Success") == 2, status

    shown = experiments(json.loads(run(["dvc", "exp", "show", "--json"], faces_repo).stdout))
    assert len(shown) == 2, shown.keys()
    # The README's comparison in a 160-column terminal: the experiments by name and both
    # accuracies, none of them collapsed to "…"
    table = run(
        ["dvc", "exp", "show", "--no-pager", "--only-changed", "--keep", "accuracy"],
        faces_repo,
        COLUMNS="160",
    ).stdout
    header = next(line for line in table.splitlines() if "Experiment" in line)
    for column in ("accuracy.scratch", "accuracy.transfer"):
        assert f" {column} " in header, table
    assert all(f"[{name}]" in table for name in shown), table
    for data in shown.values():
        accuracy = data["metrics"][EVALUATE_METRICS]["data"]["accuracy"]
        assert set(accuracy) == {"scratch", "transfer"}

    client = MlflowClient(f"sqlite:///{faces_repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    by_name = {name: [r for r in runs if r.data.tags.get("dvc_exp_name") == name] for name in shown}
    for name, exp_runs in by_name.items():
        stages = sorted(r.data.tags["cnnpipe.stage"] for r in exp_runs)
        assert stages == ["evaluate", "pipeline", "train"], (name, stages)
        assert all(r.info.status == "FINISHED" for r in exp_runs)
        train = next(r for r in exp_runs if r.data.tags["cnnpipe.stage"] == "train")
        lr = shown[name]["params"]["params.yaml"]["data"]["train"]["lr"]
        assert train.data.params["lr"] == str(lr)
        pipeline = next(r for r in exp_runs if r.data.tags["cnnpipe.stage"] == "pipeline")
        assert pipeline.info.run_name == name and pipeline.data.params["train.lr"] == str(lr)
        accuracy = shown[name]["metrics"][EVALUATE_METRICS]["data"]["accuracy"]
        for model, value in accuracy.items():  # MLflow's row for the experiment = dvc exp show's
            assert pipeline.data.metrics[f"accuracy.{model}"] == value
        # artifacts live in the repository, not in the deleted temporary workspace
        artifacts = Path(train.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(faces_repo / "mlruns"), artifacts
        assert (artifacts / "learning_curves.png").is_file()
    first, second = (
        [min(r.info.start_time for r in rs), max(r.info.end_time for r in rs)]
        for rs in by_name.values()
    )
    assert first[0] < second[1] and second[0] < first[1], "the experiments did not overlap"
