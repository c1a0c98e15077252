import numpy as np
import pytest

from cnnpipe import store


def test_split_round_trip_is_memory_mapped(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    store.write_split(tmp_path, "train", images, np.arange(5))
    split = store.read_split(tmp_path, "train")
    read_images, read_labels = split.images, split.labels
    assert isinstance(read_images, np.memmap)
    np.testing.assert_array_equal(read_images, images)
    assert read_labels.dtype == np.int64


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
