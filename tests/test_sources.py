import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.errors import UserError
from cnnpipe.sources import load_folder, load_source
from conftest import digit_images


def test_builtin_digits_are_ten_classes_of_rgb_images():
    loaded = load_source("builtin:digits", 16)
    assert loaded.images.shape == (1797, 16, 16, 3) and loaded.images.dtype == np.uint8
    assert loaded.classes == [str(d) for d in range(10)]
    assert np.bincount(loaded.labels).min() > 170
    assert loaded.images.max() == 255


def test_builtin_faces_are_binary():
    loaded = load_source("builtin:faces", 20)
    assert loaded.images.shape == (200, 20, 20, 3)
    assert loaded.classes == ["face", "non_face"]
    assert np.bincount(loaded.labels).tolist() == [100, 100]


def test_folder_reads_every_format_and_mode_as_rgb(image_folder):
    loaded = load_folder(image_folder, 20)
    assert loaded.classes == ["one", "seven", "zero"]
    assert loaded.images.shape == (36, 20, 20, 3)
    assert np.bincount(loaded.labels).tolist() == [12, 12, 12]
    assert loaded.bad_images == []


def test_exif_orientation_is_applied(tmp_path):
    for name in ("tall", "wide"):
        (tmp_path / name).mkdir()
    # A wide image: left half black, right half white. Stored with EXIF orientation 8
    # (rotate 90 degrees counter-clockwise to display), it shows black at the bottom.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(pixels).save(tmp_path / "tall" / "a.jpg", exif=exif, quality=100)
    Image.fromarray(pixels).save(tmp_path / "wide" / "b.jpg", quality=100)
    loaded = load_folder(tmp_path, 20)
    rotated, plain = loaded.images[loaded.labels == 0][0], loaded.images[loaded.labels == 1][0]
    assert plain[:, :8].mean() < 30 and plain[:, -8:].mean() > 225
    assert rotated[:8].mean() > 225 and rotated[-8:].mean() < 30


def _add_bad_files(folder):
    (folder / "zero" / "corrupt.png").write_bytes(b"these bytes are no picture" * 20)
    (folder / "zero" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (folder / "zero" / "empty.jpg").write_bytes(b"")
    (folder / "one" / "notes.txt").write_text("not an image")
    good = (folder / "seven" / "00.png").read_bytes()
    (folder / "seven" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_files_are_skipped_and_listed_with_reasons(image_folder):
    _add_bad_files(image_folder)
    loaded = load_folder(image_folder, 20)
    assert loaded.images.shape[0] == 36
    reasons = {bad.path.split("/")[-1]: bad.kind for bad in loaded.bad_images}
    assert reasons == {
        "corrupt.png": "unreadable",
        "broken.png": "decode_error",
        "empty.jpg": "empty_file",
        "notes.txt": "not_an_image",
        "truncated.png": "decode_error",
    }


def test_on_bad_image_fail_names_the_file(image_folder):
    _add_bad_files(image_folder)
    with pytest.raises(UserError, match=r"one/notes\.txt: not an image file type .*skip"):
        load_folder(image_folder, 20, on_bad_image="fail")


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_folder(tmp_path, 16)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_folder(tmp_path / "nowhere", 16)


def test_one_class_is_a_clear_error(tmp_path):
    (tmp_path / "only").mkdir()
    for i, image in enumerate(digit_images(3, 5)):
        image.save(tmp_path / "only" / f"{i}.png")
    with pytest.raises(UserError, match="needs at least 2"):
        load_folder(tmp_path, 16)


def test_class_without_usable_image_is_a_clear_error(image_folder):
    for path in (image_folder / "seven").iterdir():
        path.write_bytes(b"")
    with pytest.raises(UserError, match="seven .*no usable image"):
        load_folder(image_folder, 16)


def test_hidden_files_and_folders_are_ignored(image_folder):
    """What notebooks, macOS and tools leave in a folder is not data."""
    checkpoints = image_folder / "zero" / ".ipynb_checkpoints"
    checkpoints.mkdir()
    shutil.copy(image_folder / "zero" / "00.png", checkpoints / "00-checkpoint.png")
    (image_folder / "zero" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (image_folder / "one" / "._01.png").write_bytes(b"AppleDouble")
    shutil.copytree(image_folder / "seven", image_folder / ".trash")
    loaded = load_folder(image_folder, 20)
    assert loaded.classes == ["one", "seven", "zero"]
    assert np.bincount(loaded.labels).tolist() == [12, 12, 12]
    assert loaded.bad_images == []


def test_class_folder_links_are_followed_and_other_folder_links_listed(image_folder, tmp_path):
    """A linked class folder is a class; inside a class, a link to a folder outside the data
    folder is not followed (a whole tree would join the class unseen), nor is a loop."""
    outside = tmp_path / "outside"
    for digit, name in ((8, "eight"), (0, "more_zeros")):
        (outside / name).mkdir(parents=True)
        for i, image in enumerate(digit_images(digit, 5, size=20)):
            image.save(outside / name / f"{i}.png")
    (image_folder / "eight").symlink_to(outside / "eight", target_is_directory=True)
    (image_folder / "zero" / "more").symlink_to(outside / "more_zeros", target_is_directory=True)
    (image_folder / "one" / "nested" / "loop").parent.mkdir()
    (image_folder / "one" / "nested" / "loop").symlink_to(image_folder / "one")
    loaded = load_folder(image_folder, 20)
    assert loaded.classes == ["eight", "one", "seven", "zero"]
    assert np.bincount(loaded.labels).tolist() == [5, 12, 12, 12]
    skipped = {Path(bad.path).name: (bad.kind, bad.reason) for bad in loaded.bad_images}
    assert skipped.keys() == {"loop", "more"}
    assert skipped["loop"][0] == "link_loop" and "loop" in skipped["loop"][1]
    assert skipped["more"][0] == "outside_link" and "outside the data folder" in skipped["more"][1]


def test_a_broken_link_is_listed_with_its_reason(image_folder, tmp_path):
    """What `dvc gc` leaves of a folder checked out with DVC's symlink cache."""
    (image_folder / "seven" / "gone.png").symlink_to(tmp_path / "cache" / "ab" / "cdef")
    loaded = load_folder(image_folder, 20)
    assert [(Path(bad.path).name, bad.kind) for bad in loaded.bad_images] == [
        ("gone.png", "broken_link")
    ]
    assert loaded.bad_images[0].reason == f"broken link to {tmp_path}/cache/ab/cdef"
    with pytest.raises(UserError, match=r"seven/gone\.png: broken link to .*cdef \(remove"):
        load_folder(image_folder, 20, on_bad_image="fail")


def test_a_named_pipe_is_reported_not_opened(image_folder):
    """Opening a FIFO would block prepare until something writes to it."""
    os.mkfifo(image_folder / "one" / "pipe.png")
    loaded = load_folder(image_folder, 20)
    assert [(Path(bad.path).name, bad.kind) for bad in loaded.bad_images] == [
        ("pipe.png", "not_a_file")
    ]


def test_names_that_are_not_utf8_are_reported_printably(image_folder):
    """A class folder and a file whose names are not UTF-8 (an old camera, a Windows zip):
    class names and paths come out with the bytes as \\xNN, which any output can print."""
    latin1 = b"sev\xe9n".decode("utf-8", "surrogateescape")
    (image_folder / "seven").rename(image_folder / latin1)
    (image_folder / latin1 / b"\xff.png".decode("utf-8", "surrogateescape")).write_bytes(b"x")
    loaded = load_folder(image_folder, 20)
    assert loaded.classes == ["one", "sev\\xe9n", "zero"]
    [bad] = loaded.bad_images
    assert bad.path.endswith("/sev\\xe9n/\\xff.png")
    for text in (*loaded.classes, bad.path, bad.reason):
        text.encode("utf-8", "strict")  # what a strict UTF-8 stdout does to a printed line
