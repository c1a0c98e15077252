"""`cnnpipe retrain`, the steps of the retrain workflow, on CPU against a local DVC remote."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from shell import run

pytestmark = pytest.mark.e2e


def test_retrain_pulls_runs_the_overrides_pushes_and_summarises(faces_repo, tmp_path):
    remote, summary = tmp_path / "remote", tmp_path / "summary.md"

    result = run(
        ["cnnpipe", "retrain", "--remote", str(remote), "--set", "train.lr=0.01"],
        faces_repo,
        GITHUB_STEP_SUMMARY=str(summary),
    )
    steps = [line for line in result.stdout.splitlines() if line.startswith("retrain: ")]
    assert steps == [
        "retrain: dvc pull (outputs the remote lacks are rebuilt)",
        "retrain: dvc exp run -S train.lr=0.01",
        "retrain: dvc push",
        "retrain: compare with main",
        f"retrain: summary appended to $GITHUB_STEP_SUMMARY ({summary})",
    ]
    assert yaml.safe_load((faces_repo / "params.yaml").read_text())["train"]["lr"] == 0.01
    text = summary.read_text()
    lr_row = next(line for line in text.splitlines() if "| train.lr " in line)
    assert [cell.strip() for cell in lr_row.split("|")[3:5]] == ["0.003", "0.01"], text
    assert "reports/evaluate/metrics.json" in text and "accuracy.scratch" in text, text

    # The outputs are in the remote; the remote's address stays out of the committed config.
    cloud = run(["dvc", "status", "--cloud"], faces_repo)
    assert "in sync" in cloud.stdout, cloud.stdout
    assert any(remote.rglob("*")) and "ci" not in (faces_repo / ".dvc" / "config").read_text()
    client = MlflowClient(f"sqlite:///{faces_repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    stages = sorted(r.data.tags["cnnpipe.stage"] for r in runs)
    assert stages == ["evaluate", "pipeline", "train"]  # lr changed: train and what follows
    assert all(r.data.tags.get("dvc_exp_name") for r in runs)

    # Without a remote: no pull, no push, the summary on stdout; nothing left to rerun.
    run(["dvc", "remote", "remove", "--local", "ci"], faces_repo)
    again = run(["cnnpipe", "retrain", "--set", "train.lr=0.01"], faces_repo)
    assert "retrain: skip dvc pull: no DVC remote configured" in again.stdout
    assert "retrain: skip dvc push: no DVC remote configured" in again.stdout
    assert "## cnnpipe retrain" in again.stdout
    assert again.stdout.count("didn't change, skipping") == 5, again.stdout
    # record runs on every repro: a new experiment name is a new pipeline execution
    assert "recorded this pipeline execution as MLflow run" in again.stdout
