import os
import signal

import numpy as np
import pytest

from cnnpipe import store
from cnnpipe.errors import UserError


def test_split_round_trip_is_memory_mapped(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    store.write_split(tmp_path, "train", images, np.arange(5))
    split = store.read_split(tmp_path, "train")
    read_images, read_labels = split.images, split.labels
    assert isinstance(read_images, np.memmap)
    np.testing.assert_array_equal(read_images, images)
    assert read_labels.dtype == np.int64


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda split: (split / "images.npy").unlink(), "images.npy cannot be read (No such file"),
        (lambda split: _cut(split / "images.npy"), "images.npy cannot be read (mmap length"),
        (lambda split: np.save(split / "labels.npy", np.array([{}])), "labels.npy cannot be read"),
        (
            lambda split: np.save(split / "labels.npy", np.arange(4)),
            "(5, 4, 4, 3) images with (4,)",
        ),
    ],
    ids=["missing", "cut short", "pickled", "unpaired"],
)
def test_a_damaged_split_is_one_line_saying_how_to_restore_it(tmp_path, damage, says):
    images = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    store.write_split(tmp_path, "train", images, np.arange(5))
    damage(tmp_path / "train")
    with pytest.raises(UserError, match="restore it") as refused:
        store.read_split(tmp_path, "train")
    assert says in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "(No such file or directory)"), (b'{"a": ', "(not JSON: Expecting value"),
     (b"\xff\xfe[", "(not JSON: 'utf-16-le' codec")],
    ids=["missing", "cut short", "not text"],
)  # fmt: skip
def test_a_damaged_json_output_is_one_line_saying_how_to_restore_it(tmp_path, content, says):
    path = tmp_path / "classes.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="restore it") as refused:
        store.read_json(path)
    assert f"{path} cannot be read {says}" in str(refused.value)


def _cut(path):
    path.write_bytes(path.read_bytes()[:150])  # the header whole, the pixels not


def test_atomic_dir_keeps_the_old_output_when_the_writer_fails(tmp_path):
    final = tmp_path / "out"
    with store.atomic_dir(final) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), store.atomic_dir(final) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fingerprint_follows_content(tmp_path):
    (tmp_path / "a").write_text("1")
    first = store.fingerprint(tmp_path)
    assert store.fingerprint(tmp_path) == first
    (tmp_path / "a").write_text("2")
    assert store.fingerprint(tmp_path) != first


def test_ctrl_c_during_a_write_takes_effect_when_it_is_done():
    """torch.save interrupted mid-file fails as it closes, and its error replaces Ctrl-C's
    KeyboardInterrupt (a traceback instead of "stopped"): Ctrl-C waits for the write. An
    ignored SIGINT (a background job) stays ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        written = False
        with pytest.raises(KeyboardInterrupt), store.ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            written = True
        assert written
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with store.ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
