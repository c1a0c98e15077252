"""Data in a DVC remote: push, clone afresh, pull, and nothing is left to rerun."""

from __future__ import annotations

import pytest

from shell import commit, run

pytestmark = pytest.mark.e2e

OUTPUTS = ("models/scratch/weights.pt", "reports/evaluate/metrics.json", "reports/prepare.json")


def test_a_fresh_clone_pulls_everything_and_reproduces_nothing(faces_repo, tmp_path):
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    run(["dvc", "remote", "add", "--default", "storage", str(remote)], faces_repo)
    commit(faces_repo, "remote")
    run(["dvc", "push"], faces_repo)

    run(["git", "clone", "-q", str(faces_repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    for output in OUTPUTS:
        assert (clone / output).read_bytes() == (faces_repo / output).read_bytes(), output
    status = run(["dvc", "status"], clone)
    assert status.stdout.split() == ["record:", "always", "changed"], status.stdout
    repro = run(["dvc", "repro"], clone)  # only record runs: it looks at the MLflow store
    assert repro.stdout.count("didn't change, skipping") == 5, repro.stdout
    # the pulled models' training runs are in another store: nothing to register them from
    assert "not registered: the MLflow run that trained the chosen model" in repro.stdout
