"""The pipeline against a real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts):
runs and artifacts arrive; a server that is down stops a stage in one line; a server lost
during training or evaluation does not stop the stage (evaluate then skips the registry)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cnnpipe import cli, tracking
from conftest import FACES, copy_repo, write_params
from shell import BIN, environment, free_port, mlflow_server, run, stop
from test_pipeline import lock_md5s

pytestmark = pytest.mark.e2e

STAGES = ("prepare", "augment", "train", "transfer", "evaluate", "pipeline")
LOST_EPOCHS = 30  # long enough that the server is killed while they run


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("server")
    with mlflow_server(folder) as (uri, _):
        yield uri, folder


@pytest.fixture(scope="module")
def tracked_repo(tmp_path_factory, server) -> Path:
    """The tiny pipeline, run once with the module's server as its tracking store."""
    repo = copy_repo(tmp_path_factory.mktemp("tracked") / "repo")
    write_params(repo, FACES)
    run(["dvc", "repro"], repo, MLFLOW_TRACKING_URI=server[0])
    return repo


def test_the_pipeline_logs_its_runs_and_artifacts_to_the_server(server, tracked_repo):
    uri, folder = server
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    assert sorted(r.data.tags["cnnpipe.stage"] for r in runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not (tracked_repo / "mlflow.db").exists()
    train = next(r for r in runs if r.data.tags["cnnpipe.stage"] == "train")
    assert train.info.artifact_uri.startswith("mlflow-artifacts:")
    names = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert "learning_curves.png" in names, names
    assert "test_accuracy" in train.data.metrics  # written back by evaluate
    version = client.get_model_version_by_alias("cnnpipe-classifier", "champion")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    listed = json.loads(logged.tags["mlflow.modelVersions"])  # the server lists it, record too
    assert [str(entry["version"]) for entry in listed] == [str(version.version)]  # once
    model = client.get_run(train.info.run_id).outputs.model_outputs[0].model_id
    stored = client.get_logged_model(model).artifact_location
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{stored}/data/scratch/meta.json",
        dst_path=str(folder / "download"),
        tracking_uri=uri,
    )
    assert Path(local).read_text() == (tracked_repo / "models/scratch/meta.json").read_text()
    assert any((folder / "artifacts").rglob("learning_curves.png"))


def test_the_same_params_write_the_same_bytes_whatever_the_store(faces_baseline, tracked_repo):
    """Two clean tiny runs, one on SQLite (the committed baseline), one on a server: byte-identical
    outputs for every stage but evaluate (which measures latency), and identical scores."""
    first, second = lock_md5s(faces_baseline), lock_md5s(tracked_repo)
    for stage in ("prepare", "augment", "train", "transfer"):
        assert first[stage] == second[stage], stage
    for report in ("train/metrics.json", "transfer/metrics.json", "evaluate/metrics.json"):
        assert (faces_baseline / "reports" / report).read_text() == (
            tracked_repo / "reports" / report
        ).read_text()


def test_an_unreachable_server_stops_a_stage_in_one_line(tracked_repo):
    uri = f"http://127.0.0.1:{free_port()}"
    failed = run(["cnnpipe", "train"], tracked_repo, expect=2, MLFLOW_TRACKING_URI=uri)
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"cnnpipe train: error: MLflow tracking server {uri} is unreachable ("
    ), failed.stderr
    assert lines[0].endswith("start it, or unset MLFLOW_TRACKING_URI to use the local mlflow.db")


def test_a_server_lost_during_training_does_not_stop_it(tracked_repo, tmp_path):
    write_params(tracked_repo, FACES | {"train.epochs": LOST_EPOCHS})
    with mlflow_server(tmp_path / "lost") as (uri, process):
        training = subprocess.Popen(
            [str(BIN / "cnnpipe"), "train"],
            cwd=tracked_repo,
            text=True,
            # fail at once on the lost server, not after seconds of retries
            env=environment(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        sent = wait_for_first_epoch(MlflowClient(uri), training)
        stop(process)  # the server is gone from here on
        out, err = training.communicate(timeout=600)
    assert training.returncode == 0, out + err
    assert 1 <= sent < LOST_EPOCHS
    warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow server")]
    assert len(warnings) == 2, err
    assert f"{uri} unreachable; not sent: epoch " in warnings[0]
    assert "metrics (train_loss, train_accuracy, val_loss, val_accuracy" in warnings[0]
    assert (
        "was lost; run" in warnings[1]
        and "; model; description; fingerprint tag; run status FINISHED" in warnings[1]
    )
    history = (tracked_repo / "reports/train/history.csv").read_text().splitlines()
    assert len(history) == 1 + LOST_EPOCHS
    assert "best_val_accuracy" in (tracked_repo / "reports/train/metrics.json").read_text()


def test_a_server_lost_during_evaluate_still_writes_its_outputs(tracked_repo, tmp_path):
    folder = tmp_path / "lost"
    with mlflow_server(folder) as (uri, process):
        evaluation = subprocess.Popen(
            [str(BIN / "cnnpipe"), "evaluate"],
            cwd=tracked_repo,
            text=True,
            # fail at once on the lost server, not after 7 s of retries per call
            env=environment(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_for_a_run(folder / "server.db", evaluation)  # evaluate's own run has started
        stop(process)
        out, err = evaluation.communicate(timeout=600)
    assert evaluation.returncode == 0, out + err
    assert f"warning: MLflow server {uri} unreachable; not sent: " in err, err
    chosen = json.loads((tracked_repo / "reports/evaluate/chosen.json").read_text())
    assert chosen["model"] in ("scratch", "transfer")  # for record to register, once it is back
    scores = json.loads((tracked_repo / "reports/evaluate/metrics.json").read_text())
    assert set(scores["accuracy"]) == {"scratch", "transfer"}


def test_results_for_an_earlier_run_do_not_fail_on_a_lost_server(tmp_path, monkeypatch):
    """What evaluate does: test metrics written back into the train run, the server gone."""
    with mlflow_server(tmp_path / "lost") as (uri, process):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not in 7 s
        with tracking.stage_run("train", "exp", {}) as train:
            pass
        upstream = {"train": train.run_id}
        with tracking.stage_run("evaluate", "exp", {}, upstream=upstream) as evaluation:
            stop(process)
            evaluation.log_test_results("train", {"test_accuracy": 0.9}, [])
            assert evaluation.server_lost()
    assert evaluation.not_sent == [f"test results for run {train.run_id}", "run status FINISHED"]


def test_a_server_lost_before_the_run_is_created_does_not_stop_the_stage(tmp_path, monkeypatch):
    with mlflow_server(tmp_path / "lost") as (uri, process):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        tracking.check_server()
        stop(process)  # found at the start, gone before the run is created
        run = tracking.StageRun(uri, log_images=True)
        run.start("exp", "train", {}, {"train.lr": 0.01})
        run.log_metrics({"val_accuracy": 0.5}, step=1)
        run.end("FINISHED")
    assert run.run_id is None and run.server_lost()
    assert run.not_sent == ["the run itself", "params", "epoch 1 metrics (val_accuracy)"]


def test_a_stage_failing_on_a_lost_server_says_so_in_one_line(monkeypatch, capsys):
    def talks_to_the_server(stage: str) -> int:
        raise ConnectionError("the tracking server went away mid-stage")

    monkeypatch.setattr(cli, "run_stage", talks_to_the_server)
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["evaluate"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"cnnpipe evaluate: error: MLflow tracking server {uri} was lost ("
    ), lines
    assert lines[0].endswith("start it again, then rerun the stage (dvc repro)")
    # with a store that answers, the failure is not the server's: its traceback stays
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(ConnectionError):
        cli.main(["evaluate"])


def wait_for_first_epoch(client: MlflowClient, training: subprocess.Popen) -> int:
    """How many epochs the server holds once it holds one (the train run's val_accuracy)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert training.poll() is None, training.communicate()
        experiment = client.get_experiment_by_name("cnnpipe")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and (history := client.get_metric_history(runs[0].info.run_id, "val_accuracy")):
            return len(history)
        time.sleep(0.1)
    raise AssertionError("no epoch reached the server")


def wait_for_a_run(database: Path, stage: subprocess.Popen) -> None:
    """Until the server's SQLite store holds a run (read directly: the test kills the server
    next, and this answers without a request)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert stage.poll() is None, stage.communicate()
        with (
            contextlib.suppress(sqlite3.OperationalError),  # no table yet, or busy
            contextlib.closing(sqlite3.connect(database, timeout=1)) as db,
        ):
            if db.execute("SELECT count(*) FROM runs").fetchone()[0]:
                return
        time.sleep(0.05)
    raise AssertionError("no run reached the server")
