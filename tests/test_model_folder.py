"""A model folder that is broken or tampered with: one line naming the file, nothing run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cnnpipe import engine, networks, serving, store
from cnnpipe.errors import UserError

META = {
    "architecture": "seed_cnn",
    "classes": ["no", "yes"],
    "image_size": 16,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "best_epoch": 1,
}


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "scratch"
    network = networks.build("seed_cnn", num_classes=2, image_size=16)
    meta = store.ModelMeta.model_validate_json(json.dumps(META))
    store.write_model_folder(folder, network.state_dict(), meta)
    return folder


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def broken(folder: Path, case: str, marker: Path) -> None:
    meta, weights = folder / "meta.json", folder / "weights.pt"
    if case == "no meta.json":
        meta.unlink()
    elif case == "meta.json not JSON":
        meta.write_text("{architecture: seed_cnn")
    elif case == "a field missing":
        meta.write_text(json.dumps({k: v for k, v in META.items() if k != "classes"}))
    elif case == "an unknown architecture":
        meta.write_text(json.dumps(META | {"architecture": "vgg99"}))
    elif case == "zero std":
        meta.write_text(json.dumps(META | {"std": [0, 0, 0]}))
    elif case == "a text image size":
        meta.write_text(json.dumps(META | {"image_size": "16"}))
    elif case == "weights of another shape":
        meta.write_text(json.dumps(META | {"classes": ["a", "b", "c"]}))
    elif case == "a pickle that runs code":
        weights.write_bytes(pickle.dumps(Payload(marker)))
    elif case == "no weights":
        weights.unlink()
    elif case == "weights that are not a file":
        weights.unlink()
        weights.mkdir()
    elif case == "meta.json a pipe":  # a read would wait for a writer forever
        meta.unlink()
        os.mkfifo(meta)
    elif case == "weights from /dev/zero":  # a read would never end
        weights.unlink()
        weights.symlink_to("/dev/zero")


CASES = [
    ("no meta.json", "meta.json not found"),
    ("meta.json not JSON", "meta.json: the file: Invalid JSON"),
    ("a field missing", "meta.json: classes: Field required"),
    ("an unknown architecture", "meta.json: architecture: Value error, unknown architecture"),
    ("zero std", "meta.json: std: Value error, every std must be above 0"),
    ("a text image size", "meta.json: image_size: Input should be a valid integer"),
    ("weights of another shape", "weights.pt does not fit seed_cnn for 3 classes"),
    ("a pickle that runs code", "weights.pt was refused: not a plain state dict"),
    ("no weights", "weights.pt not found"),
    ("weights that are not a file", "weights.pt was refused"),
    ("meta.json a pipe", "meta.json is not a regular file (a pipe, socket or device)"),
    ("weights from /dev/zero", "weights.pt is not a regular file (a pipe, socket or device)"),
]


@pytest.mark.parametrize(("case", "expected"), CASES)
def test_a_broken_model_folder_is_one_line_and_runs_nothing(good_folder, tmp_path, case, expected):
    folder = Path(shutil.copytree(good_folder, tmp_path / "scratch"))
    marker = tmp_path / "code-ran"
    broken(folder, case, marker)
    with pytest.raises(UserError) as caught:
        networks.load_trained(folder)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_predict_with_a_broken_model_folder_prints_one_line(good_folder, tmp_path):
    folder = Path(shutil.copytree(good_folder, tmp_path / "scratch"))
    broken(folder, "zero std", tmp_path / "marker")
    result = subprocess.run(
        [sys.executable, "-m", "cnnpipe", "predict", "--model", str(folder), "x.png"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "meta.json: std" in lines[0], result.stderr


def test_a_good_folder_loads(good_folder):
    model, meta = networks.load_trained(good_folder)
    assert meta.classes == ["no", "yes"]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 1)


def test_a_served_512_px_model_answers_a_large_request_in_batches_of_bounded_memory(
    good_folder, tmp_path
):
    """A transfer model at 512 px takes about 70 MiB an image in a forward pass: served, it
    predicts real digits in batches that hold at most `engine.BATCH_MEMORY` (not 256 images,
    over 17 GiB), with the same answers as one pass over every image. A small model keeps
    batches of 256."""
    folder = tmp_path / "transfer"
    network = networks.build("efficientnet_lite0", num_classes=2, image_size=16, input_size=512)
    large = META | {"architecture": "efficientnet_lite0", "input_size": 512}
    meta = store.ModelMeta.model_validate_json(json.dumps(large))
    store.write_model_folder(folder, network.state_dict(), meta)
    classifier = serving.ImageClassifier(folder)
    assert 4 <= classifier.batch_size <= 24, classifier.batch_size
    digits = (load_digits().images[: classifier.batch_size + 1] * 255 / 16).astype(np.uint8)
    images = np.repeat(np.kron(digits, np.ones((2, 2), np.uint8))[..., None], 3, axis=-1)
    batched = classifier.probabilities(images)
    at_once = engine.predict_probabilities(
        classifier.model, images, classifier.norm, serving.CPU, len(images)
    )
    np.testing.assert_allclose(batched, at_once, rtol=1e-4, atol=1e-6)
    assert serving.ImageClassifier(good_folder).batch_size == 256
