"""Streaming prepare and augment: worker processes, bad files, split files, DVC-tracked folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from dvc.cli import main as dvc
from PIL import Image

from cnnpipe import store
from cnnpipe.layout import PREPARE_REPORT, PREPARED
from cnnpipe.params import load_params
from cnnpipe.sources import load_source
from cnnpipe.stages import prepare
from cnnpipe.stages.augment import augmented_copies, build_policy, write_augmented
from conftest import REPO, TINY, write_params

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


def colour_folder(root: Path, per_class: int) -> Path:
    """One class per colour, each image a plain square of it (sizes and formats vary): an
    image's pixels say which label it must carry. More files than one decode chunk holds."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = 12 + i % 9
            suffix = ("png", "jpg", "bmp")[i % 3]
            Image.new("RGB", (side, side), colour).save(root / name / f"{i:03d}.{suffix}")
    (root / "green" / "notes.txt").write_text("not an image")
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "blue" / "corrupt.jpg").write_bytes(b"not a jpeg" * 10)
    return root


def prepare_with(folder: Path, workdir: Path, workers: int) -> dict:
    data = {"data.source": f"folder:{folder}", "data.image_size": 16, "data.workers": workers}
    write_params(workdir, TINY | data)
    prepare.run(load_params())
    return json.loads(PREPARE_REPORT.read_text())


def test_workers_give_the_same_splits_and_report_bad_files(tmp_path, workdir):
    folder = colour_folder(tmp_path / "colours", per_class=200)  # 3 chunks of 256 files
    in_process = prepare_with(folder, workdir, workers=1)
    shutil.copytree(PREPARED, tmp_path / "in_process")
    in_workers = prepare_with(folder, workdir, workers=2)

    assert store.fingerprint(PREPARED) == store.fingerprint(tmp_path / "in_process")
    assert in_workers == in_process
    assert {Path(b["path"]).name: b["kind"] for b in in_workers["bad_images"]} == {
        "notes.txt": "not_an_image",
        "empty.png": "empty_file",
        "corrupt.jpg": "unreadable",
    }
    assert sum(sum(c.values()) for c in in_workers["images"].values()) == 3 * 200
    assert_memory_mapped_and_labelled_by_colour(PREPARED)


def assert_memory_mapped_and_labelled_by_colour(prepared: Path) -> None:
    """Every split is .npy files that open memory-mapped, and each image is its label's colour
    (so bad files in between did not shift images against labels)."""
    classes = store.read_classes(prepared)
    for split in store.SPLITS:
        images = np.load(prepared / split / "images.npy", mmap_mode="r")
        labels = np.load(prepared / split / "labels.npy", mmap_mode="r")
        assert isinstance(images, np.memmap) and images.shape[1:] == (16, 16, 3)
        assert len(images) == len(labels) and labels.dtype == np.int64
        centre = images[:, 8, 8].astype(int)
        expected = np.array([COLOURS[classes[label]] for label in labels])
        assert np.abs(centre - expected).max() < 12, split


def test_split_writer_writes_what_np_save_writes(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int64)
    with store.SplitWriter(tmp_path / "streamed", (4, 4, 3)) as writer:
        for rows in (slice(0, 3), slice(3, 3), slice(3, 10)):
            writer.append(images[rows], labels[rows])
    for name, array in (("images.npy", images), ("labels.npy", labels)):
        np.save(tmp_path / name, array)
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / name).read_bytes()


def test_augment_in_chunks_writes_the_same_bytes_as_in_memory(tmp_path):
    loaded = load_source("builtin:digits", 16)
    images, labels = loaded.images[:300], loaded.labels[:300]  # 2 chunks of 256 rows
    store.write_split(tmp_path, "train", images, labels)
    on_disk = store.read_split(tmp_path, "train").images
    params = load_params(REPO / "params.yaml").augment.model_copy(
        update={"rotate_p": 1.0, "shift_scale_p": 1.0}
    )

    write_augmented(on_disk, labels, build_policy(params, 3), 2, tmp_path / "out")
    streamed = store.read_split(tmp_path / "out", "train")
    streamed, streamed_labels = streamed.images, streamed.labels
    in_memory = augmented_copies(images, build_policy(params, 3), 2)
    np.testing.assert_array_equal(streamed, np.concatenate([images, in_memory]))
    np.testing.assert_array_equal(streamed_labels, np.tile(labels, 3))


def test_prepare_reads_a_folder_tracked_with_dvc_add(tmp_path, workdir):
    colour_folder(workdir / "data" / "raw", per_class=12)
    for command in (["init", "--no-scm", "-q"], ["config", "cache.type", "symlink"]):
        assert dvc(command) == 0
    assert dvc(["add", "-q", "data/raw"]) == 0
    assert (workdir / "data" / "raw.dvc").exists()
    assert (workdir / "data" / "raw" / "red" / "000.png").is_symlink()

    report = prepare_with(Path("data/raw"), workdir, workers=1)
    assert report["classes"] == ["blue", "green", "red"]
    assert sum(sum(c.values()) for c in report["images"].values()) == 3 * 12
