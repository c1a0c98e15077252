"""Links can't relabel, images decode as they look, and faults on disk end in one line: link
loops and links out of a class are listed skips; transparent pixels show the background; a
corrupt checkpoint is set aside; a full disk names the path and leaves no temporary file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnpipe import engine, images, store
from cnnpipe.errors import MAX_MESSAGE, UserError
from cnnpipe.sources import list_folder


def two_classes(root: Path) -> Path:
    for name, colour in (("cats", (200, 0, 0)), ("dogs", (0, 0, 200))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(root / name / f"{i}.png")
    return root


def skips(root: Path) -> dict[str, str]:
    return {Path(bad.path).name: bad.kind for bad in list_folder(root).skipped}


def test_links_that_would_relabel_or_leave_the_tree_are_listed(tmp_path):
    root = two_classes(tmp_path / "data")
    outside = two_classes(tmp_path / "elsewhere")
    (root / "cats" / "up").symlink_to(root, target_is_directory=True)
    (root / "cats" / "stolen.png").symlink_to(root / "dogs" / "0.png")
    (root / "cats" / "more").symlink_to(outside / "dogs", target_is_directory=True)
    (root / "cats" / "self").symlink_to(root / "cats" / "self")
    (root / "dogs" / "ping").symlink_to(root / "dogs" / "pong")
    (root / "dogs" / "pong").symlink_to(root / "dogs" / "ping")
    (root / "dogs" / "cached.png").symlink_to(outside / "dogs" / "0.png")  # DVC's cache: kept
    (root / "birds").symlink_to(root / "dogs", target_is_directory=True)
    listing = list_folder(root)
    assert listing.classes == ["cats", "dogs"]
    assert np.bincount(listing.labels).tolist() == [3, 4]
    assert skips(root) == {
        "up": "relabelling_link",
        "stolen.png": "relabelling_link",
        "more": "outside_link",
        "self": "link_loop",
        "ping": "link_loop",
        "pong": "link_loop",
        "birds": "relabelling_link",
    }


def png(mode: str, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (4, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_transparent_pixels_show_the_white_background():
    hidden_red = images.decode_bytes(png("RGBA", (255, 0, 0, 0)), 4)
    half_black = images.decode_bytes(png("LA", (0, 128)), 4)
    assert (hidden_red == 255).all()
    assert np.abs(half_black.astype(int) - 127).max() <= 1
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)  # RGBA pixels, fully transparent
    assert (images.from_pixels(pixels, 4) == 255).all()


@pytest.mark.parametrize("name", ["photo.jfif", "photo.JPE", "photo"])
def test_jpegs_are_read_by_content_whatever_their_name(tmp_path, name):
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / name, "JPEG")
    assert images.decode_file(tmp_path / name, 8)[..., 1].mean() > 150


def test_misleading_reasons_are_gone(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "notes").write_text("no image here")
    with pytest.raises(images.UnreadableImage, match="a folder, not an image file"):
        images.decode_file(tmp_path / "folder.png", 8)
    with pytest.raises(images.UnreadableImage, match="unknown or corrupt"):
        images.decode_file(tmp_path / "notes", 8)
    tifffile = pytest.importorskip("tifffile")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.random.default_rng(0).random((8, 8, 3), dtype=np.float32))
    with pytest.raises(images.UnreadableImage, match="pixel layout that is not supported") as err:
        images.decode_bytes(buffer.getvalue(), 8)
    assert "corrupt" not in str(err.value)


def broken(path: Path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"model": torch.ones(1000), "key": "k"}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "a list":
        torch.save([torch.ones(2)], path)
    elif kind == "a folder":
        (path / "inside").mkdir(parents=True)
    elif kind == "text":
        path.write_text("not a checkpoint")


@pytest.mark.parametrize("kind", ["empty", "truncated", "a list", "a folder", "text"])
def test_a_bad_checkpoint_is_set_aside_in_one_line(tmp_path, kind, capsys):
    checkpoint = engine.Checkpoint(tmp_path / "checkpoint.pt", "k")
    broken(checkpoint.path, kind)
    assert checkpoint.load() is None
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"checkpoint {checkpoint.path} ") and "set aside" in line
    assert not checkpoint.path.exists() and checkpoint.set_aside_path.exists()
    checkpoint.save({"model": torch.ones(2)})  # and the next save resumes normally
    assert checkpoint.load()["model"].tolist() == [1, 1]


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")


def full_disk_at(staging: Path) -> None:
    """Make the write to `staging` go to /dev/full, which answers every write with ENOSPC."""
    staging.symlink_to("/dev/full")


@needs_dev_full
def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    full_disk_at(tmp_path / f".report.json.tmp-{os.getpid()}")
    with pytest.raises(UserError, match=rf"no space left on the disk writing {target} \("):
        store.write_json_atomic(target, {"a": 1})
    assert list(tmp_path.iterdir()) == []

    checkpoint = engine.Checkpoint(tmp_path / "checkpoint.pt", "k")
    full_disk_at(tmp_path / ".checkpoint.pt.tmp")
    with pytest.raises(UserError, match=r"about 4,000 bytes needed"):
        checkpoint.save({"model": torch.ones(1000)})
    assert list(tmp_path.iterdir()) == []


@needs_dev_full
def test_a_full_disk_while_writing_a_split_removes_the_staging_folder(tmp_path):
    final = tmp_path / "prepared"
    with pytest.raises(UserError, match=f"writing {final}"), store.atomic_dir(final) as staging:
        (staging / "train").mkdir()
        full_disk_at(staging / "train" / "images.npy")
        store.write_split(staging, "train", np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4))
    assert list(tmp_path.iterdir()) == []


def test_every_user_error_is_one_capped_line():
    message = str(UserError("bad value:\n" + "x" * 100_000 + "\r\nend"))
    assert "\n" not in message and "\r" not in message and len(message) <= MAX_MESSAGE
    assert message.endswith("more characters)")


def test_a_folder_whose_entries_vanish_as_it_is_read_is_one_line(tmp_path):
    """/proc/self/fd lists the descriptor that reads it, closed by the time it is looked at;
    a file deleted while prepare lists a shared folder is the same case. And a file given as
    the data folder is said to be one."""
    listing = list_folder(Path("/proc/self"))
    gone = [skip for skip in listing.skipped if skip.kind == "cannot_open"]
    assert any("/proc/self/fd/" in skip.path for skip in gone), listing.skipped
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="photo.jpg is not a folder"):
        list_folder(tmp_path / "photo.jpg")
