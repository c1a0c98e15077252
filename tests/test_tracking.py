import os
import signal
import subprocess
import sys
from urllib.parse import urljoin

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cnnpipe import registry, tracking


def test_repo_root_of_a_dvc_experiment_copy_is_the_outer_repository(tmp_path):
    (tmp_path / ".dvc").mkdir()
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123" / "src"
    copy.mkdir(parents=True)
    assert tracking.repo_root(copy) == tmp_path
    assert tracking.repo_root(tmp_path / ".dvc") == tmp_path


def test_default_uri_is_an_absolute_sqlite_file_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_report_pictures_are_linked_for_any_port_the_ui_serves_on(mlflow_store, tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("# R\n\n![a](figures/a.png)\n")
    with tracking.stage_run("evaluate", "linked", {}) as run:
        run.log_report(tmp_path / "report.md", tmp_path / "figures")
    logged = mlflow.artifacts.load_text(f"runs:/{run.run_id}/report.md")
    link = logged.split("](")[1].rstrip(")\n")
    assert link == tracking.artifact_address(run.run_id, "figures/a.png")
    for ui in ("http://127.0.0.1:5000/#/experiments/1", "http://0.0.0.0:5057/#/experiments/1"):
        # as the browser resolves it on the UI's page (MLflow shows only http(s) addresses)
        host = ui.split("/#")[0]
        expected = f"{host}/get-artifact?run_uuid={run.run_id}&path=figures%2Fa.png"
        assert link.startswith("http:") and urljoin(ui, link) == expected


def test_artifact_addresses_keep_a_servers_scheme_and_path(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org/team/")
    link = tracking.artifact_address("r1", "figures/a.png")
    assert link == "https:/team/get-artifact?run_uuid=r1&path=figures%2Fa.png"


def test_stage_run_tags_params_and_is_found_by_fingerprint(mlflow_store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lynx")
    with tracking.stage_run(
        "train", "exp", {"lr": 0.1}, model="seed_cnn", upstream={"prepare": "abc"}
    ) as r:
        r.log_metrics({"val_accuracy": 0.5}, step=1)
        r.set_fingerprint("f00d")
    run = MlflowClient(mlflow_store).get_run(r.run_id)
    assert run.info.run_name == "train-seed_cnn"
    assert run.data.params == {"lr": "0.1"}
    assert run.data.tags["cnnpipe.stage"] == "train"
    assert run.data.tags["dvc_exp_name"] == "brisk-lynx"
    assert run.data.tags["cnnpipe.upstream.prepare"] == "abc"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run.data.tags["mlflow.source.git.commit"] == head.strip()
    assert tracking.find_run("exp", "train", "f00d") == r.run_id
    assert tracking.find_run("exp", "train", "beef") is None
    assert tracking.find_run("exp", "it's", "f00d") is None  # a quote is data, not syntax


def test_the_experiment_opens_on_training_runs_and_is_described(mlflow_store):
    with tracking.stage_run("prepare", "described", {}):
        pass
    experiment = MlflowClient(mlflow_store).get_experiment_by_name("described")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "pipeline" in experiment.tags["mlflow.note.content"]


def test_results_reach_the_training_run_once(mlflow_store):
    with tracking.stage_run("train", "once", {}) as train:
        pass
    for accuracy in (0.9, 0.5):
        upstream = {"train": train.run_id}
        with tracking.stage_run("evaluate", "once", {}, upstream=upstream) as evaluation:
            evaluation.log_test_results("train", {"test_accuracy": accuracy}, [])
    history = MlflowClient(mlflow_store).get_metric_history(train.run_id, "test_accuracy")
    assert [m.value for m in history] == [0.9]  # the second evaluation recorded its own


def test_a_failing_stage_leaves_a_failed_run_that_is_not_found(mlflow_store):
    with pytest.raises(RuntimeError), tracking.stage_run("augment", "exp", {}) as r:
        r.set_fingerprint("cafe")
        raise RuntimeError("boom")
    assert MlflowClient(mlflow_store).get_run(r.run_id).info.status == "FAILED"
    assert tracking.find_run("exp", "augment", "cafe") is None


KILLED_STAGE = """
import os, signal
from cnnpipe import tracking
with tracking.stage_run("prepare", "killed", {}) as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_marks_a_killed_run_of_its_stage(mlflow_store, tmp_path):
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_STAGE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=os.environ | {"MLFLOW_TRACKING_URI": mlflow_store},
    )
    assert killed.returncode == -signal.SIGKILL
    left = killed.stdout.split()[0]
    client = MlflowClient(mlflow_store)
    assert client.get_run(left).info.status == "RUNNING"
    with tracking.stage_run("augment", "killed", {}):  # another stage leaves it alone
        assert client.get_run(left).info.status == "RUNNING"
    with tracking.stage_run("prepare", "killed", {}) as again:
        pass
    assert client.get_run(left).info.status == "KILLED"
    assert client.get_run(again.run_id).info.status == "FINISHED"


def test_filter_values_are_quoted_safely():
    assert tracking.quoted("cnnpipe-classifier") == "'cnnpipe-classifier'"
    assert tracking.quoted("O'Brien") == '"O\'Brien"'
    with pytest.raises(Exception, match="both kinds of quotes"):
        tracking.quoted("""it's "x" """)


def test_the_champion_gate_orders_evaluates_of_one_repository_and_its_queue_copies(
    tmp_path, monkeypatch
):
    (tmp_path / ".dvc").mkdir()
    queue_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
    queue_copy.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    other = "\n".join(
        [
            "from cnnpipe import registry",
            "print('ready', flush=True)",
            "with registry.champion_gate():",
            "    print('in')",
        ]
    )
    with registry.champion_gate():
        waiting = subprocess.Popen(
            [sys.executable, "-c", other], cwd=queue_copy, stdout=subprocess.PIPE, text=True
        )
        assert waiting.stdout.readline() == "ready\n"
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)  # the queue copy's evaluate waits for this one
    assert waiting.communicate(timeout=60)[0] == "in\n"
