"""The one image decoder (`cnnpipe.images`): a seeded mutation fuzzer over real images, the
decoding rules, and the same pixels through prepare and through the served model."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps, PngImagePlugin
from skimage import data as skimage_data
from sklearn.datasets import load_digits

from cnnpipe import images, serving
from cnnpipe.images import UnreadableImage
from cnnpipe.sources import list_folder, load_folder
from conftest import BIN, TINY, write_params
from shell import run

SIZE = 16
# What the decoder caught before it caught everything: any other exception from a corrupt file
# stopped prepare and predict with a traceback.
CAUGHT_BEFORE = (OSError, SyntaxError, Image.DecompressionBombError)


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def exif(orientation: int, gps: bool = True) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    tags[0x010F] = "cnnpipe"  # Make
    if gps:  # (Pillow cannot write a GPS block into a TIFF)
        tags[0x8825] = {1: "N", 2: (52.0, 31.0, 12.5)}  # latitude
    return tags


@cache
def seed_files() -> dict[str, bytes]:
    """Small real images in every supported format, with the modes and metadata that lead into
    the corners of Pillow's plugins: EXIF (orientation, GPS), text chunks, palettes with
    transparency, 1-bit, grey with alpha, 16-bit and float grey, CMYK, compressed TIFF,
    animated GIF, lossless WebP."""
    digit = Image.fromarray((load_digits().images[7] * 255 / 16).astype(np.uint8)).resize((24, 24))
    cat = Image.fromarray(skimage_data.chelsea()).resize((40, 28))
    face = Image.fromarray(skimage_data.astronaut()).resize((32, 32))
    ramp = np.linspace(0, 60000, 24 * 24).reshape(24, 24)
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "cnnpipe")
    return {
        "png": encoded(face, "PNG", pnginfo=text, exif=exif(6)),
        "png_bits": encoded(digit.convert("1"), "PNG"),
        "png_alpha": encoded(digit.convert("LA"), "PNG"),
        "png16": encoded(Image.fromarray(ramp.astype(np.uint16)), "PNG"),
        "png_palette": encoded(digit.convert("P"), "PNG", transparency=0),
        "jpg": encoded(cat, "JPEG", exif=exif(6), quality=90),
        "jpg_cmyk": encoded(cat.convert("CMYK"), "JPEG", progressive=True),
        "gif": encoded(digit.convert("P"), "GIF", comment=b"cnnpipe"),
        "gif_frames": encoded(digit, "GIF", save_all=True, append_images=[cat.convert("L")]),
        "tif": encoded(face, "TIFF", exif=exif(3, gps=False)),
        "tif_bits": encoded(digit.convert("1"), "TIFF", compression="group4"),
        "tif_cmyk": encoded(cat.convert("CMYK"), "TIFF", compression="tiff_deflate"),
        "tif_lzw": encoded(cat, "TIFF", compression="tiff_lzw"),
        "tif16": encoded(Image.fromarray(ramp.astype(np.uint16)), "TIFF"),
        "tif_float": encoded(Image.fromarray(ramp.astype(np.float32) / 1000 - 7), "TIFF"),
        "webp": encoded(cat, "WEBP", exif=exif(8)),
        "webp_lossless": encoded(face, "WEBP", lossless=True),
        "bmp": encoded(digit.convert("RGB"), "BMP"),
        "bmp_palette": encoded(digit.convert("P"), "BMP"),
    }


INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def mutated(data: bytes, rng: random.Random) -> bytes:
    """`data` with 1 to 3 random edits. Half of them write an interesting 16- or 32-bit
    number at an even offset of the first 256 bytes, where header fields, chunk lengths and
    TIFF tags are; the others set a byte, flip a bit, insert or delete bytes (mostly in the
    first 256 too) or cut the tail off."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            layout = rng.choice(["<H", ">H", "<I", ">I"])
            at = rng.randrange(0, max(min(len(out), 256), 1), 2)
            number = rng.choice(INTERESTING) & (0xFFFF if "H" in layout else 0xFFFFFFFF)
            out[at : at + struct.calcsize(layout)] = struct.pack(layout, number)
            continue
        limit = min(len(out), 256) if rng.random() < 0.7 else len(out)
        at = rng.randrange(max(limit, 1))
        edit = rng.randrange(5)
        if edit == 0 and out:
            out[at] = rng.randrange(256)
        elif edit == 1 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif edit == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif edit == 3:
            del out[at : at + rng.randint(1, 16)]
        else:
            del out[at:]
    return bytes(out)


def fuzz_cases(count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`count` mutated seed files, in turn from each seed: (seed name, bytes)."""
    rng = random.Random(seed)
    seeds = seed_files()
    names = sorted(seeds)
    for number in range(count):
        name = names[number % len(names)]
        yield name, mutated(seeds[name], rng)


def test_fuzzed_images_decode_or_are_reported_unreadable(capsys):
    """Six thousand mutated real images: each one decodes to a square or raises UnreadableImage
    with a one-line reason; no other exception, no warning, nothing printed. (Among these
    cases, 14 raise a ValueError inside Pillow that the decoder once let through.)"""
    outcomes, escaped = Counter(), Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, data in fuzz_cases(6000, seed=1):
            try:
                pixels = images.decode_bytes(data, SIZE)
            except UnreadableImage as err:
                outcomes[err.kind] += 1
                assert str(err) and "\n" not in str(err)
            except Exception as err:
                escaped[f"{name}: {type(err).__name__}: {err}"] += 1
            else:
                assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
                outcomes["decoded"] += 1
    assert not escaped, escaped.most_common(10)
    assert [str(warning.message) for warning in caught] == []
    assert capsys.readouterr().err == ""  # Pillow's logged errors are not printed either
    assert outcomes["decoded"] > 1000 and outcomes["decode_error"] > 1000, outcomes


def crashed_before(count: int) -> list[tuple[str, bytes]]:
    """The first `count` fuzz cases (those of the fuzz test) whose exception inside Pillow the
    decoder did not catch before it caught them all."""
    found = []
    for name, data in fuzz_cases(6000, seed=1):
        try:
            images.decode_bytes(data, SIZE)
        except UnreadableImage as err:
            if err.__context__ is not None and not isinstance(err.__context__, CAUGHT_BEFORE):
                found.append((name, data))
        if len(found) == count:
            return found
    raise AssertionError(f"only {len(found)} such fuzz cases")


def write_fuzzed_files(folder: Path, crashing: int = 8, others: int = 16) -> list[Path]:
    """Files in `folder`, with their format's suffix: `crashing` mutated images whose
    exceptions (ValueError, ...) stopped the old decoder, and `others` of any outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = crashed_before(crashing) + list(fuzz_cases(others, seed=2))
    files = []
    for number, (name, data) in enumerate(cases):
        suffix = re.match("[a-z]+", name)[0]  # png16 -> png
        files.append(folder / f"fuzz-{number:02d}-{name}.{suffix}")
        files[-1].write_bytes(data)
    return files


def hostile_folder(root: Path) -> list[Path]:
    """Three classes of real digits plus what a hostile folder holds: files that crashed the
    old decoder, a file name that is not UTF-8, a broken link, a link loop, a hidden folder
    and file, and a class folder that is a link. (A class folder name that is not UTF-8 is
    tested in test_sources: MLflow refuses it as a metric name until per-class numbers move
    to a table.)"""
    digits = load_digits()
    for digit, name in ((0, "zero"), (1, "one"), (2, "two")):
        folder = root.parent / "elsewhere" / name if digit == 1 else root / name
        folder.mkdir(parents=True)
        for i, pixels in enumerate(digits.images[digits.target == digit][:12]):
            Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(folder / f"{i:02d}.png")
    (root / "one").symlink_to(root.parent / "elsewhere" / "one", target_is_directory=True)
    fuzzed = write_fuzzed_files(root / "zero" / "fuzzed", crashing=8, others=16)
    (root / "zero" / b"caf\xe9.png".decode("utf-8", "surrogateescape")).write_bytes(
        (root / "zero" / "00.png").read_bytes()[:40]
    )
    (root / "zero" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "zero" / "again").symlink_to(root / "zero", target_is_directory=True)
    (root / "zero" / ".ipynb_checkpoints").mkdir()
    (root / "zero" / ".ipynb_checkpoints" / "00-checkpoint.png").write_bytes(b"not read")
    (root / "zero" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return fuzzed


@pytest.mark.e2e
def test_prepare_process_survives_a_hostile_folder(tmp_path):
    """`cnnpipe prepare` as a process under a strict UTF-8 stdout: no traceback; bad files,
    the broken link and the loop listed; hidden ones ignored; the linked class read."""
    folder = tmp_path / "images"
    fuzzed = hostile_folder(folder)
    work = tmp_path / "work"
    work.mkdir()
    data = {"data.source": f"folder:{folder}", "data.image_size": SIZE, "data.workers": 2}
    write_params(work, TINY | data)
    result = run(
        [str(BIN / "cnnpipe"), "prepare"],
        work,
        PYTHONIOENCODING="utf-8:strict",
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
    )
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    report = json.loads((work / "reports" / "prepare.json").read_text())
    assert report["classes"] == ["one", "two", "zero"]
    decoded = sum(sum(counts.values()) for counts in report["images"].values())
    assert decoded + len(report["bad_images"]) == 3 * 12 + len(fuzzed) + 3  # café, link, loop
    skipped = {Path(bad["path"]).name: bad["kind"] for bad in report["bad_images"]}
    assert {path.name for path in fuzzed[:8]} <= skipped.keys()  # those that crashed before
    assert skipped["caf\\xe9.png"] == "unreadable"
    assert skipped["gone.png"] == "broken_link" and skipped["again"] == "link_loop"
    assert "skipped" in result.stdout and "caf\\xe9.png" in result.stdout
    assert not any("/." in bad["path"] for bad in report["bad_images"])  # hidden: not read


def check_predict_answers_each_file(model_dir: Path, cwd: Path, folder: Path) -> None:
    """`cnnpipe predict --model <model_dir>` on fuzzed files and a good one, under a strict
    UTF-8 stdout: one line per file (an answer or an error), no traceback. Needs a trained
    model folder, e.g. `check_predict_answers_each_file(repo / "models/scratch", repo,
    tmp_path)` with a session fixture's reproduced repository."""
    files = write_fuzzed_files(folder / "fuzzed")
    good = folder / b"g\xf6od.png".decode("utf-8", "surrogateescape")
    good.write_bytes(seed_files()["png"])
    result = run(
        [str(BIN / "cnnpipe"), "predict", "--model", str(model_dir), str(good), *map(str, files)],
        cwd,
        expect=1,  # some files are errors
        PYTHONIOENCODING="utf-8:strict",
    )
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(files)
    assert lines[0].startswith(f"{images.safe_name(good)}: ") and "error" not in lines[0]
    for number, (path, line) in enumerate(zip(files, lines[1:], strict=True)):
        assert line.startswith(f"{path}: "), line
        if number < 8:  # those that crashed the old decoder
            assert line.startswith(f"{path}: error: cannot decode image: "), line


# The decoding rules.


def previous_decoder(path: Path, size: int) -> np.ndarray:
    """What `sources.read_image` did before there was one decoder."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC))


def test_normal_images_decode_to_the_same_pixels_as_before(image_folder, tmp_path):
    photos = {
        "cat_rotated.jpg": (skimage_data.chelsea(), {"exif": exif(6), "quality": 95}),
        "coffee_upside_down.jpg": (skimage_data.coffee(), {"exif": exif(3)}),
        "astronaut.png": (skimage_data.astronaut(), {}),
        "camera.png": (skimage_data.camera(), {}),
    }
    for name, (pixels, options) in photos.items():
        Image.fromarray(pixels).save(tmp_path / name, **options)
    files = [*list_folder(image_folder).files, *(tmp_path / name for name in photos)]
    for path in files:
        for size in (SIZE, 64):
            np.testing.assert_array_equal(
                images.decode_file(path, size), previous_decoder(path, size), err_msg=str(path)
            )


def test_a_file_gives_the_same_pixels_to_prepare_and_to_the_served_model(image_folder):
    """The folder source (prepare) and the served model's cells: file bytes, base64 text, and
    the file's full-size RGB pixels."""
    prepared = load_folder(image_folder, SIZE)
    files = list_folder(image_folder).files
    cells = [path.read_bytes() for path in files]
    text = [base64.b64encode(cell).decode() for cell in cells]
    full_size = []
    for path in files:
        with Image.open(path) as image:
            full_size.append(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
    for batch in (cells, text, full_size):
        served = serving.to_batch(pd.DataFrame({"image": batch}), SIZE)
        np.testing.assert_array_equal(served, prepared.images)
    stacked = serving.to_batch(np.stack(full_size[:3]), SIZE)
    np.testing.assert_array_equal(stacked, prepared.images[:3])


@pytest.mark.parametrize(
    ("image_format", "block"),
    [("PNG", b"II*\x00"), ("WEBP", b"Exif\x00\x00garbage"), ("PNG", b"XX")],
    ids=["png-struct-error", "webp-not-tiff", "png-too-short"],
)
def test_a_malformed_exif_block_keeps_the_image(image_format, block):
    """Pillow's getexif() raises struct.error or SyntaxError on these EXIF blocks: the
    decoder keeps the image, as stored."""
    cat = Image.fromarray(skimage_data.chelsea()).resize((48, 32))
    options = {"lossless": True} if image_format == "WEBP" else {}
    stored = encoded(cat, image_format, exif=block, **options)
    with Image.open(io.BytesIO(stored)) as image, pytest.raises((struct.error, SyntaxError)):
        image.getexif()
    np.testing.assert_array_equal(
        images.decode_bytes(stored, SIZE),
        images.decode_bytes(encoded(cat, image_format, **options), SIZE),
    )


def test_an_exif_block_that_broke_exif_transpose_keeps_image_and_orientation():
    """A tag with the wrong type made Pillow's exif_transpose raise struct.error after
    rotating: the decoder rotates the image as the (readable) orientation says."""
    cat = Image.fromarray(skimage_data.chelsea()).resize((48, 32))
    good = exif(6).tobytes()
    malformed = good.replace(b"\x01\x0f\x00\x02", b"\x01\x2d\x00\x02")  # Make: TransferFunction
    assert malformed != good
    stored = encoded(cat, "JPEG", exif=malformed)
    with Image.open(io.BytesIO(stored)) as image, pytest.raises(struct.error):
        ImageOps.exif_transpose(image)
    np.testing.assert_array_equal(
        images.decode_bytes(stored, SIZE),
        images.decode_bytes(encoded(cat, "JPEG", exif=good), SIZE),
    )


@pytest.mark.parametrize(
    ("values", "image_format"),
    [
        (np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16), "PNG"),
        (np.linspace(1000, 4095, 64 * 64).reshape(64, 64).astype(np.uint16), "TIFF"),  # 12-bit
        (np.linspace(-1e6, 2e9, 64 * 64).reshape(64, 64).astype(np.int32), "TIFF"),
        (np.linspace(-0.5, 0.25, 64 * 64).reshape(64, 64).astype(np.float32), "TIFF"),
    ],
    ids=["16-bit", "12-bit in 16", "int32", "float"],
)
def test_high_bit_depth_grey_is_stretched_over_its_own_range(values, image_format):
    """A dark-to-bright gradient keeps its gradient: its darkest value black, its brightest
    white, in between a straight ramp (decoded at its own size: no resampling)."""
    pixels = images.decode_bytes(encoded(Image.fromarray(values), image_format), 64)
    expected = np.linspace(0, 255, 64 * 64).reshape(64, 64)
    assert np.abs(pixels[..., 0] - expected).max() <= 1
    assert np.all(pixels[..., 0] == pixels[..., 2])  # still grey


def test_float_grey_maps_nan_and_infinities_and_a_flat_image_is_black():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0], values[0, 1], values[7, 7] = np.nan, -np.inf, np.inf
    pixels = images.decode_bytes(encoded(Image.fromarray(values), "TIFF"), 8)[..., 0]
    assert pixels[0, 0] == pixels[0, 1] == 0 and pixels[7, 7] == 255 and pixels[4, 4] > 100
    flat = np.full((8, 8), 1234, dtype=np.uint16)
    assert images.decode_bytes(encoded(Image.fromarray(flat), "PNG"), 8).max() == 0


@pytest.mark.parametrize("image_format", ["EPS", "ICO", "DDS", "TGA", "PCX", "SGI"])
def test_other_formats_are_refused_by_content_whatever_the_name(tmp_path, image_format):
    face = Image.fromarray(skimage_data.astronaut()).resize((32, 32))
    path = tmp_path / "looks_fine.png"
    path.write_bytes(encoded(face if image_format != "DDS" else face.convert("RGBA"), image_format))
    with pytest.raises(UnreadableImage) as refused:
        images.decode_file(path, SIZE)
    assert refused.value.kind == "unsupported_format"
    assert str(refused.value) == (
        f"{image_format} content is not a supported image format (jpg, png, bmp, gif, webp, tiff)"
    )


def test_a_supported_format_is_read_by_content_whatever_the_suffix(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(seed_files()["png"])
    assert images.decode_file(path, SIZE).shape == (SIZE, SIZE, 3)


def test_errors_that_pillow_logs_are_not_printed(tmp_path):
    """Pillow logs some corrupt files at ERROR level (here: a TIFF that claims 2048 samples
    per pixel); in a process with no logging configured Python would print the line raw. (A
    process of its own: pytest's log capture would hide the line.)"""
    tiff = bytearray(encoded(Image.new("RGB", (4, 4)), "TIFF"))
    at = tiff.index(b"\x15\x01\x03\x00\x01\x00\x00\x00")  # SamplesPerPixel: short, 1 value
    tiff[at + 8 : at + 10] = (2048).to_bytes(2, "little")
    (tmp_path / "samples.tif").write_bytes(tiff)
    code = (
        "import sys; from pathlib import Path; from cnnpipe import images\n"
        "try: images.decode_file(Path(sys.argv[1]), 16)\n"
        "except images.UnreadableImage as err: print(err)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "samples.tif")], capture_output=True, text=True
    )
    assert result.stdout.startswith("not a readable image (corrupt TIFF") and not result.stderr


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds none: what a decompression bomb
    looks like to a decoder before it reads the pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7000, 10_000, 20_000])
def test_huge_images_are_refused_before_their_pixels_are_read(side, capsys):
    """Above the decoder's limit, above Pillow's warning and above its error threshold."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnreadableImage) as refused:
            images.decode_bytes(png_header(side, side), SIZE)
    assert refused.value.kind == "too_large" and "too large" in str(refused.value)
    assert not caught and capsys.readouterr().err == ""


def test_a_jpeg_over_the_limit_is_downscaled_while_decoding(monkeypatch):
    """With the limit at 10,000 pixels, a 451 x 300 JPEG is decoded at 1/4 of its size (and
    comes out close to the full decode); a PNG of the same size is refused."""
    cat = Image.fromarray(skimage_data.chelsea())
    full = images.decode_bytes(encoded(cat, "JPEG", quality=95), SIZE).astype(int)
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    drafted = images.decode_bytes(encoded(cat, "JPEG", quality=95), SIZE).astype(int)
    assert np.abs(drafted - full).mean() < 6
    with pytest.raises(UnreadableImage, match="too large: 451 x 300 pixels"):
        images.decode_bytes(encoded(cat, "PNG"), SIZE)


@pytest.mark.parametrize(
    "pixels",
    [
        [[1, 2], [3]],
        np.zeros((4, 4, 2)),
        np.zeros((0, 4, 3)),
        np.full((4, 4, 3), 256),
        np.full((4, 4), np.nan),
        np.full((4, 4, 3), "a"),
    ],
    ids=["ragged", "two channels", "empty", "over 255", "nan", "text"],
)
def test_pixel_arrays_that_are_not_images_are_refused(pixels):
    with pytest.raises(UnreadableImage) as refused:
        serving.to_batch(pd.DataFrame({"image": [np.zeros((4, 4, 3)), pixels]}), SIZE)
    assert refused.value.kind == "bad_pixels" and str(refused.value).startswith("image 1: ")


def test_safe_name_prints_any_file_name_on_one_line():
    name = b"caf\xe9\n\x1b[31m\xc3\xa9.png".decode("utf-8", "surrogateescape")
    assert images.safe_name(name) == "caf\\xe9\\n\\x1b[31mé.png"
    assert images.safe_name(Path("a/b c.png")) == "a/b c.png"
