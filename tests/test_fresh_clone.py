"""A fresh clone's first `dvc repro` ends ready to use, whether or not this host reproduces
the committed `dvc.lock`: where it does, DVC skips evaluate and record still registers the
chosen model; where its CPU trains other bytes (simulated by a lock whose model hashes differ),
evaluate reruns on the new models and record registers. Either way the README's
`cnnpipe predict` answers next and names the version."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shell import commit, run

pytestmark = pytest.mark.e2e


def fresh_clone(baseline: Path, folder: Path) -> Path:
    clone = folder / "clone"
    run(["git", "clone", "-q", str(baseline), str(clone)], folder)
    return clone


def assert_ready_to_predict(clone: Path) -> None:
    predicted = run(["cnnpipe", "predict", "samples/digit-7.png"], clone)
    assert predicted.stderr.splitlines()[-1] == "model: cnnpipe-classifier version 1 (@champion)"
    assert predicted.stdout.startswith("samples/digit-7.png: ")


def test_a_fresh_clone_that_reproduces_the_lock_is_ready_to_predict(faces_baseline, tmp_path):
    clone = fresh_clone(faces_baseline, tmp_path)
    repro = run(["dvc", "repro"], clone)
    assert "Stage 'evaluate' didn't change, skipping" in repro.stdout, repro.stdout
    assert "is the first champion" in repro.stdout, repro.stdout
    assert_ready_to_predict(clone)


def test_a_fresh_clone_on_a_host_that_trains_other_bytes_is_ready_to_predict(
    faces_baseline, tmp_path
):
    clone = fresh_clone(faces_baseline, tmp_path)
    lock_file = clone / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text())
    text = lock_file.read_text()
    for stage in ("train", "transfer"):  # the bytes another CPU's kernels would have written
        for out in lock["stages"][stage]["outs"]:
            if out["path"].startswith("models/"):
                text = text.replace(out["md5"], "0" * 32 + ".dir")
    lock_file.write_text(text)
    commit(clone, "the lock of a host whose CPU trains other bytes")

    repro = run(["dvc", "repro"], clone)
    assert "Running stage 'evaluate'" in repro.stdout, repro.stdout
    assert "is the first champion" in repro.stdout, repro.stdout
    assert_ready_to_predict(clone)
