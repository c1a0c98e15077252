"""Real training processes: killed and resumed, and two DDP processes on CPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnpipe import engine, networks, store
from conftest import FACES, TINY, write_params

pytestmark = pytest.mark.e2e

CNNPIPE = str(Path(sys.executable).parent / "cnnpipe")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder with the prepared and augmented faces, ready for `cnnpipe train`."""
    folder = tmp_path_factory.mktemp("prepared")
    write_params(folder, FACES)
    for stage in ("prepare", "augment"):
        subprocess.run(
            [CNNPIPE, stage], cwd=folder, env=_env(folder), check=True, capture_output=True
        )
    return folder


def _env(folder: Path) -> dict[str, str]:
    return os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}


def _copy(prepared: Path, target: Path, train: dict) -> Path:
    shutil.copytree(prepared, target)
    write_params(target, FACES | {f"train.{key}": value for key, value in train.items()})
    return target


def _checkpointed_epochs(path: Path) -> int:
    try:
        return len(torch.load(path, weights_only=True)["history"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def test_killed_training_resumes_to_the_same_weights(prepared, tmp_path):
    long_run = {"model": "small_cnn", "epochs": 16}
    straight = _copy(prepared, tmp_path / "straight", long_run)
    subprocess.run(
        [CNNPIPE, "train"], cwd=straight, env=_env(straight), check=True, capture_output=True
    )

    killed = _copy(prepared, tmp_path / "killed", long_run)
    process = subprocess.Popen(
        [CNNPIPE, "train"],
        cwd=killed,
        env=_env(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "checkpoints" / "train" / "last.pt"
    deadline = time.monotonic() + 120
    while _checkpointed_epochs(checkpoint) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert 2 <= _checkpointed_epochs(checkpoint) < 16
    assert not (killed / "models" / "scratch").exists()

    resumed = subprocess.run(
        [CNNPIPE, "train"], cwd=killed, env=_env(killed), capture_output=True, text=True, check=True
    )
    assert "resuming after epoch" in resumed.stderr
    assert "epoch 1/16" not in resumed.stderr
    weights = [store.read_weights(d / "models" / "scratch") for d in (straight, killed)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_stops_a_training_in_one_line_and_marks_its_run_killed(prepared, tmp_path, nproc):
    """Ctrl-C (SIGINT to the terminal's process group): one line saying how to go on, exit
    status 130, no traceback from any process, and the stage's MLflow run KILLED."""
    folder = _copy(prepared, tmp_path / "stopped", {"epochs": 1000, "nproc": nproc})
    process = subprocess.Popen(
        [CNNPIPE, "train"],
        cwd=folder,
        env=_env(folder),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a runner's SIG_IGN
    )
    checkpoint = folder / "checkpoints" / "train" / "last.pt"
    deadline = time.monotonic() + 120
    while _checkpointed_epochs(checkpoint) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "cnnpipe train: stopped: run it again to go on from its last finished epoch"
    )
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe").experiment_id
    (run,) = client.search_runs([experiment], filter_string="tags.`cnnpipe.stage` = 'train'")
    assert run.info.status == "KILLED"


def test_a_finished_training_publishes_its_model_again_from_its_checkpoint(prepared, tmp_path):
    folder = _copy(prepared, tmp_path / "finished", {"model": "seed_cnn", "epochs": 2})
    subprocess.run([CNNPIPE, "train"], cwd=folder, env=_env(folder), check=True)
    first = store.read_weights(folder / "models" / "scratch")
    shutil.rmtree(folder / "models" / "scratch")

    again = subprocess.run(
        [CNNPIPE, "train"], cwd=folder, env=_env(folder), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming after epoch 2" in again.stderr
    assert "epoch 1/2" not in again.stderr and "epoch 2/2" not in again.stderr
    for name, tensor in store.read_weights(folder / "models" / "scratch").items():
        assert torch.equal(tensor, first[name]), name


def test_two_cpu_processes_train_one_model_and_log_once(prepared, tmp_path):
    folder = _copy(prepared, tmp_path / "ddp", {"model": "small_cnn", "epochs": 6, "nproc": 2})
    result = subprocess.run(
        [CNNPIPE, "train"], cwd=folder, env=_env(folder), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("epoch 6/6") == 1  # only rank 0 reports

    model, meta = networks.load_trained(folder / "models" / "scratch")
    test = store.read_split(folder / "data" / "prepared", "test")
    norm = engine.Normalisation(meta.mean, meta.std)
    predicted = engine.predict_probabilities(model, test.images, norm, torch.device("cpu"))
    assert (predicted.argmax(1) == test.labels).mean() > 0.5

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe")
    train_runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`cnnpipe.stage` = 'train'"
    )
    assert len(train_runs) == 1
    assert train_runs[0].data.params["nproc"] == "2"
    history = client.get_metric_history(train_runs[0].info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(train_runs[0].data.metrics["best_val_accuracy"])


def test_an_error_in_every_process_of_a_ddp_training_is_one_line(prepared, tmp_path):
    """Each DDP process meets the same user error: it is said once, as in one process, with
    exit status 2 and none of torchrun's logs and traceback (which buried it)."""
    folder = _copy(prepared, tmp_path / "ddp", {"model": "small_cnn", "nproc": 2})
    (folder / "data" / "augmented" / "augmentation.json").unlink()
    result = subprocess.run(
        [CNNPIPE, "train"], cwd=folder, env=_env(folder), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "cnnpipe train: error: data/augmented/augmentation.json not found: run the augment "
        "stage (dvc repro augment)"
    ]


def test_a_step_too_large_for_memory_is_refused_in_one_line_before_it_starts(tmp_path):
    """Transfer at 512 px in batches of every train digit (about 1,200) takes over 70 GiB in
    its frozen phase and over 400 GiB fine-tuning, more than any machine this suite runs on has:
    refused in one line, naming the phase that needs most, before a step is taken (the kernel
    used to kill it in its frozen phase with the word "Killed"), and no model is written."""
    folder = tmp_path / "digits"
    folder.mkdir()
    write_params(folder, TINY | {"transfer.input_size": 512, "transfer.batch_size": 4096})
    for stage in ("prepare", "augment"):
        subprocess.run([CNNPIPE, stage], cwd=folder, env=_env(folder), check=True)
    result = subprocess.run(
        [CNNPIPE, "transfer"], cwd=folder, env=_env(folder), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert "at 512 px in the finetune phase needs about" in line, line
    assert "lower transfer.batch_size well below" in line and "transfer.input_size" in line
    assert "epoch" not in result.stdout + line  # refused before the first epoch
    assert not (folder / "models" / "transfer").exists()
