"""Streaming prepare and augment: worker processes, bad files, split files, DVC-tracked folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from dvc.cli import main as dvc
from PIL import Image
from sklearn.datasets import load_digits

from cnnpipe import cli, store
from cnnpipe.errors import UserError
from cnnpipe.layout import PREPARE_REPORT, PREPARED
from cnnpipe.params import load_params
from cnnpipe.sources import Chunk, ImageStream, load_source
from cnnpipe.stages import prepare
from cnnpipe.stages.augment import augmented_copies, build_policy, write_augmented
from conftest import BIN, REPO, TINY, write_params
from shell import environment, run

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


def colour_folder(root: Path, per_class: int) -> Path:
    """One class per colour, each image a plain square of it in a shade of its own (up to 5
    levels off per channel; sizes and formats vary too): an image's pixels say which label it
    must carry. More files than one decode chunk holds."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = 12 + i % 9
            suffix = ("png", "jpg", "bmp")[i % 3]
            shade = (i % 6, i // 6 % 6, i // 36 % 6)
            pixels = np.array(colour) + shade
            Image.new("RGB", (side, side), tuple(pixels)).save(root / name / f"{i:03d}.{suffix}")
    (root / "green" / "notes.txt").write_text("not an image")
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "blue" / "corrupt.jpg").write_bytes(b"not a jpeg" * 10)
    return root


def prepare_with(folder: Path, workdir: Path, workers: int) -> dict:
    data = {"data.source": f"folder:{folder}", "data.image_size": 16, "data.workers": workers}
    write_params(workdir, TINY | data)
    cli.run_stage("prepare")
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
        assert np.abs(centre - expected).max() < 20, split


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


@pytest.mark.e2e
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


# Splits that can be trusted: every class in every split, duplicates on one side.


def digit_folder(root: Path, per_class: dict[str, int]) -> Path:
    """Real handwritten digits, one class per digit name, all different images."""
    digits = load_digits()
    for number, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(digits.images[digits.target == number][:count]):
            grey = (pixels * 255 / 16).astype(np.uint8)
            Image.fromarray(grey).save(root / name / f"{i:03d}.png")
    return root


def test_a_class_too_small_for_every_split_stops_prepare_with_one_line(tmp_path, workdir):
    folder = digit_folder(tmp_path / "digits", {"zero": 30, "one": 30, "two": 2})
    with pytest.raises(UserError) as error:
        prepare_with(folder, workdir, workers=1)
    message = str(error.value)
    assert "\n" not in message
    assert "class two (2)" in message and "needs at least 8 " in message
    assert not PREPARED.exists()


def test_a_class_of_the_size_asked_for_is_in_every_split(tmp_path, workdir):
    """The size the error above asks for is enough (with 2 images the bound for all 62 is 7,
    but a class of 7 makes 67 images, for which it is 8)."""
    needed = prepare.images_needed(np.array([30, 30, 2]), 0.15, 0.2, own_test=False)
    assert needed == 8 and prepare.smallest_class(62, 0.15, 0.2, own_test=False) == 7
    folder = digit_folder(tmp_path / "digits", {"zero": 30, "one": 30, "two": needed})
    report = prepare_with(folder, workdir, workers=1)
    assert all(counts["two"] >= 1 for counts in report["images"].values()), report["images"]


def test_every_class_of_the_smallest_size_lands_in_every_split():
    """Whatever the seed, the fractions and the other classes' sizes: a split that passes
    the size check has every class in train, val and test."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        val_fraction, test_fraction = rng.uniform(0.02, 0.45, size=2)
        sizes = rng.integers(1, 40, size=rng.integers(2, 6))
        needed = prepare.smallest_class(int(sizes.sum()), val_fraction, test_fraction, False)
        sizes[rng.integers(len(sizes))] = needed  # one class at the bound, about
        labels = np.repeat(np.arange(len(sizes)), sizes)
        names = [str(c) for c in range(len(sizes))]
        try:
            splits = prepare.split_indices(
                labels, names, val_fraction, test_fraction, int(rng.integers(1000))
            )
        except UserError:
            total = len(labels)
            assert sizes.min() < prepare.smallest_class(total, val_fraction, test_fraction, False)
            continue
        checked += 1
        for split, rows in splits.items():
            missing = set(range(len(sizes))) - set(labels[rows].tolist())
            assert not missing, (split, sizes.tolist(), val_fraction, test_fraction)
    assert checked > 50


def splits_by_pixels(prepared: Path) -> dict[bytes, set[str]]:
    """For each distinct image written, the splits that hold it."""
    found: dict[bytes, set[str]] = {}
    for split in store.SPLITS:
        for image in store.read_split(prepared, split).images:
            found.setdefault(image.tobytes(), set()).add(split)
    return found


def test_identical_images_share_a_split_and_are_counted(tmp_path, workdir, capsys):
    """12 images saved again as BMP (other bytes, same pixels) and 3 of them copied into the
    other class: 12 groups, 27 images, 3 groups across labels, each group in one split."""
    folder = digit_folder(tmp_path / "digits", {"zero": 40, "one": 40})
    for i in range(12):
        Image.open(folder / "zero" / f"{i:03d}.png").save(folder / "zero" / f"again{i:02d}.bmp")
    for i in range(3):
        shutil.copy(folder / "zero" / f"{i:03d}.png", folder / "one" / f"mislabelled{i}.png")
    report = prepare_with(folder, workdir, workers=2)
    duplicates = report["duplicates"]
    assert {key: value for key, value in duplicates.items() if key != "cross_label_examples"} == {
        "groups": 12,
        "images": 27,
        "cross_label_groups": 3,
        "groups_across_splits": 0,
    }
    first = [Path(path).relative_to(folder) for path in duplicates["cross_label_examples"][0]]
    assert first == [Path("one/mislabelled0.png"), Path("zero/000.png"), Path("zero/again00.bmp")]
    assert all(len(splits) == 1 for splits in splits_by_pixels(PREPARED).values())
    assert sum(sum(counts.values()) for counts in report["images"].values()) == 95
    printed = capsys.readouterr()
    assert "(0 skipped, 27 identical images in 12 groups)" in printed.out
    assert printed.err.count("warning: 3 groups of identical images carry different labels") == 1


def test_a_source_split_of_its_own_is_kept_and_its_overlap_counted(tmp_path):
    """A torchvision-like source with its own test items: the test split stays exactly those
    items, even where one equals a train image; duplicates outside it still share a split."""
    digits = load_source("builtin:digits", 8)
    pixels, labels = digits.images[:300].copy(), digits.labels[:300]
    pixels[250] = pixels[10]  # a test image that is also a train image
    pixels[21] = pixels[11]  # two train images alike
    chunk = Chunk(np.arange(300), pixels, 300)
    stream = ImageStream(labels, digits.classes, iter([chunk]), test_items=np.arange(200, 300))
    _, duplicates = prepare.prepare_into(stream, tmp_path, 8, (0.15, 0.2), seed=0)
    test = store.read_split(tmp_path, "test")
    test_images, test_labels = test.images, test.labels
    np.testing.assert_array_equal(test_images, pixels[200:300])
    np.testing.assert_array_equal(test_labels, labels[200:300])
    assert duplicates["groups"] == 2 and duplicates["groups_across_splits"] == 1
    assert len(splits_by_pixels(tmp_path)[pixels[11].tobytes()]) == 1
    assert not (tmp_path / prepare.SPOOL).exists()


# Killed means cleaned up.


def child_processes(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def running(pid: int) -> bool:
    """Whether `pid` still runs: a zombie waiting for a parent that does not reap has ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.e2e
def test_kill_9_leaves_no_worker_and_the_next_run_removes_the_staging_folder(tmp_path):
    """`cnnpipe prepare` killed while 2 workers decode a folder of large JPEGs: the workers
    and multiprocessing's resource tracker end within seconds; the next run removes the
    staging folder the killed one left."""
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.tile(load_source("builtin:faces", 64).images[0], (40, 60, 1))).save(photo)
    for name in ("a", "b"):
        (tmp_path / "busy" / name).mkdir(parents=True)
        for i in range(150):  # about 10 s of decoding for 2 workers
            os.link(photo, tmp_path / "busy" / name / f"{i:03d}.jpg")
    work = tmp_path / "work"
    work.mkdir()
    data = {"data.source": f"folder:{tmp_path / 'busy'}", "data.image_size": 16, "data.workers": 2}
    write_params(work, TINY | data)
    env = environment(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    stage = subprocess.Popen(
        [str(BIN / "cnnpipe"), "prepare"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = work / "data" / f".prepared.tmp-{stage.pid}"
    try:
        # the resource tracker and two workers
        assert wait_for(lambda: staging.exists() and len(child_processes(stage.pid)) >= 3, 60)
        time.sleep(1)  # the workers are decoding
        helpers = child_processes(stage.pid)
        stage.kill()
        stage.wait()
        assert wait_for(lambda: not any(map(running, helpers)), 5), helpers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stage.pid, signal.SIGKILL)
    assert staging.exists()
    digit_folder(tmp_path / "small", {"zero": 20, "one": 20})
    write_params(work, TINY | data | {"data.source": f"folder:{tmp_path / 'small'}"})
    run([str(BIN / "cnnpipe"), "prepare"], work, MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
    assert sorted(path.name for path in (work / "data").iterdir()) == ["prepared"]


def test_staging_left_by_dead_processes_is_removed_and_that_of_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = os.getppid()
    for name in (f".out.tmp-{dead.pid}", f".out.old-{dead.pid}", f".out.tmp-{alive}"):
        (tmp_path / name).mkdir()
    (tmp_path / f".report.json.tmp-{dead.pid}").write_text("{")
    with store.atomic_dir(tmp_path / "out") as staging:
        (staging / "done").touch()
    store.write_json_atomic(tmp_path / "report.json", {})
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f".out.tmp-{alive}",
        "out",
        "report.json",
    ]
