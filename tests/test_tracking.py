import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from cnnpipe import tracking


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


def test_stage_run_tags_params_and_is_found_by_fingerprint(mlflow_store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lynx")
    with tracking.stage_run("train", "exp", {"train.lr": 0.1}, "seed_cnn", {"prepare": "abc"}) as r:
        r.log_metrics({"val_accuracy": 0.5}, step=1)
        r.set_fingerprint("f00d")
    run = MlflowClient(mlflow_store).get_run(r.run_id)
    assert run.info.run_name == "train-seed_cnn"
    assert run.data.params == {"train.lr": "0.1"}
    assert run.data.tags["cnnpipe.stage"] == "train"
    assert run.data.tags["dvc_exp_name"] == "brisk-lynx"
    assert run.data.tags["cnnpipe.upstream.prepare"] == "abc"
    assert len(run.data.tags["git_commit"]) >= 7
    assert tracking.find_run("exp", "train", "f00d") == r.run_id
    assert tracking.find_run("exp", "train", "beef") is None
    with tracking.stage_run("evaluate", "exp", {}) as evaluation:
        evaluation.log_to_earlier_run(r.run_id, {"test_accuracy": 0.9}, {})
    assert not evaluation.server_lost()
    assert MlflowClient(mlflow_store).get_run(r.run_id).data.metrics["test_accuracy"] == 0.9


def test_a_failing_stage_leaves_a_failed_run_that_is_not_found(mlflow_store):
    with pytest.raises(RuntimeError), tracking.stage_run("augment", "exp", {}) as r:
        r.set_fingerprint("cafe")
        raise RuntimeError("boom")
    assert MlflowClient(mlflow_store).get_run(r.run_id).info.status == "FAILED"
    assert tracking.find_run("exp", "augment", "cafe") is None


def test_flatten_dots_nested_keys():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {
        "a.b": 1,
        "a.c.d": 2,
        "e": 3,
    }


def test_the_champion_gate_orders_evaluates_of_one_repository_and_its_queue_copies(
    tmp_path, monkeypatch
):
    (tmp_path / ".dvc").mkdir()
    queue_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
    queue_copy.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    other = "\n".join(
        [
            "from cnnpipe import tracking",
            "print('ready', flush=True)",
            "with tracking.champion_gate():",
            "    print('in')",
        ]
    )
    with tracking.champion_gate():
        waiting = subprocess.Popen(
            [sys.executable, "-c", other], cwd=queue_copy, stdout=subprocess.PIPE, text=True
        )
        assert waiting.stdout.readline() == "ready\n"
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)  # the queue copy's evaluate waits for this one
    assert waiting.communicate(timeout=60)[0] == "in\n"
