"""Data in a DVC remote: push, clone afresh, pull, and nothing is left to rerun."""

from __future__ import annotations

from conftest import write_params
from shell import FACES, commit, run

OUTPUTS = ("models/scratch/weights.pt", "reports/evaluate/metrics.json", "reports/prepare.json")


def test_a_fresh_clone_pulls_everything_and_reproduces_nothing(repo_copy, tmp_path):
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    write_params(repo_copy, FACES)
    run(["dvc", "remote", "add", "--default", "storage", str(remote)], repo_copy)
    run(["dvc", "repro"], repo_copy)
    commit(repo_copy, "results")
    run(["dvc", "push"], repo_copy)

    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    for output in OUTPUTS:
        assert (clone / output).read_bytes() == (repo_copy / output).read_bytes(), output
    status = run(["dvc", "status"], clone)
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    repro = run(["dvc", "repro"], clone)
    assert repro.stdout.count("didn't change, skipping") == 5, repro.stdout
    assert not (clone / "mlflow.db").exists()  # no stage ran, so nothing was logged
