"""torchvision data sets: read from their real on-disk format, one clear line when offline."""

from __future__ import annotations

import json
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from cnnpipe import cli, store
from cnnpipe.errors import UserError
from cnnpipe.layout import PREPARE_REPORT, PREPARED
from cnnpipe.params import load_params
from conftest import TINY, write_params


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx-ubyte file as MNIST ships it: magic 0x0803 (images) or 0x0801 (labels), then
    each dimension as a big-endian int32, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_mnist(root: Path, train_per_class: int, test_per_class: int) -> dict[str, np.ndarray]:
    """scikit-learn's digits scaled to 28x28, written as torchvision's MNIST/raw/ files."""
    digits = load_digits()
    parts = {}
    for part, start, count in (("train", 0, train_per_class), ("t10k", 100, test_per_class)):
        chosen = np.concatenate(
            [np.flatnonzero(digits.target == d)[start : start + count] for d in range(10)]
        )
        images = np.stack(
            [
                np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((28, 28)))
                for image in digits.images[chosen]
            ]
        )
        write_idx(root / "MNIST" / "raw" / f"{part}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{part}-labels-idx1-ubyte", digits.target[chosen])
        parts[part] = images
        parts[f"{part}-labels"] = digits.target[chosen]
    return parts


def test_prepare_reads_mnist_files_and_keeps_their_test_split(workdir):
    mnist = tiny_mnist(workdir / "data" / "torchvision", train_per_class=10, test_per_class=3)
    write_params(workdir, TINY | {"data.source": "torchvision:MNIST", "data.image_size": 16})
    cli.run_stage("prepare")

    report = json.loads(PREPARE_REPORT.read_text())
    assert report["classes"][:2] == ["0 - zero", "1 - one"] and len(report["classes"]) == 10
    test = store.read_split(PREPARED, "test")
    test_images, test_labels = test.images, test.labels
    np.testing.assert_array_equal(test_labels, mnist["t10k-labels"])
    first = Image.fromarray(mnist["t10k"][0]).convert("RGB").resize((16, 16), Image.BICUBIC)
    np.testing.assert_array_equal(test_images[0], np.asarray(first))
    sizes = {split: sum(counts.values()) for split, counts in report["images"].items()}
    assert sizes == {"train": 85, "val": 15, "test": 30}
    assert all(n == 1 or n == 2 for n in report["images"]["val"].values())


def test_an_unknown_torchvision_name_is_refused(workdir):
    write_params(workdir, {"data.source": "torchvision:ImageNet"})
    with pytest.raises(UserError, match=r"data.source = 'torchvision:ImageNet'.*CIFAR10"):
        load_params()


def test_offline_without_the_files_prepare_fails_with_one_line(workdir, monkeypatch):
    closed_port = "http://127.0.0.1:9"  # nothing listens: every download is refused, online too
    for name in ("http_proxy", "https_proxy"):
        monkeypatch.setenv(name, closed_port)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    urllib.request.install_opener(None)  # the next download builds an opener that sees them
    write_params(workdir, {"data.source": "torchvision:FashionMNIST"})
    try:
        with pytest.raises(UserError) as error:
            cli.run_stage("prepare")
    finally:
        urllib.request.install_opener(None)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not download torchvision data set FashionMNIST (")
    assert message.endswith(
        "): connect to the internet once, or put its files in data/torchvision"
    ), message
