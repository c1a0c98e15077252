"""Many machines, one study: two `cnnpipe tune` workers, each in its own clone, share a study
in a real PostgreSQL server (started here on loopback) and one MLflow store. One worker is
killed mid-trial and started again: its trial is failed and retried, and every trial of the
study runs exactly once."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from shell import environment, free_port, run

pytestmark = pytest.mark.e2e

PG_USER = "cnnpipe-pg"  # PostgreSQL refuses to run as root: the server runs as this user
TRIALS = 4
TUNE = [
    "--study", "team", "--trials", str(TRIALS), "--jobs", "1",
    "-S", "tune.target=scratch",
    "-S", "tune.pruner=none",
    "-S", "tune.stale_after_s=4",
    "-S", 'tune.space={"train.lr": {"low": 0.001, "high": 0.03, "log": true}}',
]  # fmt: skip


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        message = "PostgreSQL is not installed: apt-get install -y postgresql (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(found[-1]).parent


def as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    with contextlib.suppress(KeyError):
        pwd.getpwnam(PG_USER)
        return ["runuser", "-u", PG_USER, "--", *command]
    subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    return ["runuser", "-u", PG_USER, "--", *command]


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server in a temporary folder on 127.0.0.1; yields a database's URL."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="cnnpipe-pg-"))
    folder.chmod(0o755)
    data, port = folder / "data", free_port()
    initdb = as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres"])
    if os.geteuid() == 0:
        shutil.chown(folder, PG_USER)
    subprocess.run([*initdb, "--auth=trust"], check=True, capture_output=True)
    options = f"-p {port} -h 127.0.0.1 -k {folder}"
    pg_ctl = as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data)])
    log = folder / "server.log"
    subprocess.run([*pg_ctl, "-o", options, "-l", str(log), "-w", "start"], check=True)
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute("CREATE DATABASE optuna")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def start_worker(repo: Path, storage: str, mlflow_uri: str) -> subprocess.Popen:
    out = (repo / "worker.log").open("a")
    return subprocess.Popen(
        ["cnnpipe", "tune", "--storage", storage, *TUNE],
        cwd=repo,
        env=environment(MLFLOW_TRACKING_URI=mlflow_uri),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(condition, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def exp_names(repo: Path) -> set[str]:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout
    return {ref.rsplit("/", 1)[1] for ref in refs.split()}


def test_two_workers_share_a_study_and_a_killed_one_resumes(faces_baseline, tmp_path):
    first = Path(shutil.copytree(faces_baseline, tmp_path / "first", symlinks=True))
    second = Path(shutil.copytree(faces_baseline, tmp_path / "second", symlinks=True))
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # as a team's tracking server
    with postgres() as storage:
        one = start_worker(first, storage, mlflow_uri)
        two = start_worker(second, storage, mlflow_uri)
        logs = second / ".dvc" / "tmp" / "tune"  # a trial's log: its experiment has started

        def second_started() -> bool:
            assert two.poll() is None, (second / "worker.log").read_text()
            return any(logs.glob("*.log"))

        wait_for(second_started, "the second worker's first trial")
        time.sleep(3)
        two.send_signal(signal.SIGKILL)  # a machine that dies: no goodbye
        two.wait()
        two = start_worker(second, storage, mlflow_uri)
        for worker, repo in ((one, first), (two, second)):
            assert worker.wait(timeout=600) == 0, (repo / "worker.log").read_text()
        study = optuna.load_study(study_name="team", storage=storage)
        trials = study.get_trials()

    failed = [t for t in trials if t.state == TrialState.FAIL]
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(failed) == 1 and len(finished) == TRIALS, [(t.number, t.state) for t in trials]
    (retry,) = [t for t in finished if t.system_attrs.get("failed_trial") == failed[0].number]
    assert retry.params == failed[0].params
    names = [t.user_attrs["experiment"] for t in finished]
    assert len(set(names)) == TRIALS
    ran_first, ran_second = exp_names(first), exp_names(second)
    assert ran_first and ran_second and not ran_first & ran_second, (ran_first, ran_second)
    assert ran_first | ran_second == set(names)  # the killed trial left no experiment

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cnnpipe.stage") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(names)
