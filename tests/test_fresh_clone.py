"""A fresh clone's first `dvc repro` ends ready to use: on a host that reproduces the
committed `dvc.lock`, DVC skips evaluate, and record still registers the chosen model, so the
README's `cnnpipe predict` answers next. (Where the lock is not reproduced, evaluate reruns
and registers: tests/test_pipeline.py.)"""

from __future__ import annotations

import pytest

from shell import run

pytestmark = pytest.mark.e2e


def test_a_fresh_clone_that_reproduces_the_lock_is_ready_to_predict(faces_baseline, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(faces_baseline), str(clone)], tmp_path)
    repro = run(["dvc", "repro"], clone)
    assert "Stage 'evaluate' didn't change, skipping" in repro.stdout, repro.stdout
    assert "is the first champion" in repro.stdout, repro.stdout

    predicted = run(["cnnpipe", "predict", "samples/digit-7.png"], clone)
    assert predicted.stderr.splitlines()[-1] == "model: cnnpipe-classifier version 1 (@champion)"
    assert predicted.stdout.startswith("samples/digit-7.png: ")
