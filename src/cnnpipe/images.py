"""The one image decoder: image files, encoded bytes and pixel arrays become uint8 RGB squares.

prepare (folder sources), `cnnpipe predict` and the served model all decode here, so what a
model sees in training and in serving cannot drift apart. Decoding one image either returns
`image_size` x `image_size` x 3 uint8 pixels or raises `UnreadableImage` with a kind and a
one-line reason; no other exception and no Pillow warning comes out of it.

The rules:
- Formats are recognised by content, not by name (a file without an extension is tried too;
  one with an extension of no image type is not), and only those the README lists are decoded
  (`FORMATS`); other content (EPS, ICO, TGA, DDS, ...) is refused with its name, so no other
  decoder (nor Ghostscript, for EPS) ever reads a user's pixels.
- EXIF orientation is applied; a malformed EXIF block costs the rotation, never the image.
- Any colour mode becomes RGB: palettes are looked up, and a transparent image is composited
  on white (`BACKGROUND`), as a browser shows it on a white page. High bit-depth grey
  (16-bit, 32-bit integer, float) has no white point that cameras and scanners agree on (12-bit
  data in 16-bit files, floats in any unit), so it is stretched from its own darkest value
  (black) to its brightest (white); a flat image becomes black, NaN and -inf black, +inf white.
- An image of more than `MAX_PIXELS` pixels is downscaled while decoding where the format
  allows it (JPEG, by 2, 4 or 8) and refused otherwise, so one decode stays within about half a
  GiB of memory. Images beyond Pillow's own decompression-bomb ceiling (~179 megapixels) are
  refused before any pixel is read.
- The result is a bicubic resize to `image_size` squared (`RESIZE`): squashed (the default),
  padded with black to a square first (the whole image, its proportions kept), or cropped to
  its central square first (proportions kept, the edges lost).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")  # Pillow's names for them
SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ""}
BACKGROUND = (255, 255, 255)  # what a transparent pixel shows
SUPPORTED = "jpg, png, bmp, gif, webp, tiff"
MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000
_DOWNSCALED_WHILE_DECODING = ("JPEG", "MPO")  # MPO: a camera's JPEG with extra frames
_TRANSPOSE = {  # EXIF orientation -> the transposition that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow's plugins log some corrupt files at ERROR level; with no logging configured, Python
# would print those lines raw. The decode's own reason says what went wrong instead.
logging.getLogger("PIL").addHandler(logging.NullHandler())


class UnreadableImage(ValueError):
    """One image that cannot be used. `kind`: not_an_image | not_a_file | empty_file |
    cannot_open | unreadable | unsupported_format | too_large | decode_error | bad_pixels (and
    bad_base64 and bad_request, from serving)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def decode_file(path: Path, image_size: int, resize: str = "squash") -> np.ndarray:
    """An image file, chosen by its suffix (`SUFFIXES`) and decoded by its content."""
    try:
        status = path.stat()
    except OSError as err:
        raise UnreadableImage("cannot_open", f"cannot open: {_one_line(err)}") from None
    if stat.S_ISDIR(status.st_mode):
        raise UnreadableImage("not_a_file", "a folder, not an image file")
    if path.suffix.lower() not in SUFFIXES:
        raise UnreadableImage("not_an_image", f"not an image file type ({safe_name(path.suffix)})")
    if not stat.S_ISREG(status.st_mode):  # a pipe or device that would block the read
        raise UnreadableImage("not_a_file", "not a regular file")
    if status.st_size == 0:
        raise UnreadableImage("empty_file", "empty file (0 bytes)")
    try:
        stream = path.open("rb")
    except OSError as err:
        raise UnreadableImage("cannot_open", f"cannot open: {_one_line(err)}") from None
    with stream:
        return _decode(stream, image_size, resize)


def decode_bytes(data: bytes, image_size: int, resize: str = "squash") -> np.ndarray:
    """The bytes of an image file."""
    if not data:
        raise UnreadableImage("empty_file", "empty file (0 bytes)")
    return _decode(io.BytesIO(data), image_size, resize)


def declared_pixels(data: bytes) -> int:
    """The pixels an image file's header declares (width x height), read without decoding
    them; 0 when it is no image of `FORMATS`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                return image.width * image.height
        except Exception:  # any header Pillow cannot parse: the decode says why
            return 0


def from_pixels(pixels, image_size: int, resize: str = "squash") -> np.ndarray:
    """An H x W x 3 (RGB), H x W x 4 (RGBA, composited on white), H x W x 1 or H x W (grey) array
    of values from 0 to 255 (nested lists too), resized like a decoded file."""
    try:
        array = np.asarray(pixels)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise UnreadableImage("bad_pixels", f"not an array of pixels: {_one_line(err)}") from None
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.size == 0 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        reason = f"pixels must be H x W x 3, H x W x 4 or H x W, not {array.shape}"
        raise UnreadableImage("bad_pixels", reason)
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iuf" or not np.all((array >= 0) & (array <= 255)):
            raise UnreadableImage("bad_pixels", "pixel values must be numbers from 0 to 255")
        array = np.rint(array).astype(np.uint8)
    return _rgb_square(Image.fromarray(array), image_size, resize)


def safe_name(name: str | os.PathLike) -> str:
    """`name` (a file name, a path) as one line that any output can print: bytes that are not
    UTF-8 (kept by Python as lone surrogates) as \\xNN, control characters escaped (\\n)."""
    text = os.fspath(name)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # the byte code - 0xDC00, as os.fsdecode kept it
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:  # without the file name it may quote
        return safe_name(err.strerror)
    lines = str(err).strip().splitlines()
    return safe_name(lines[0][:200]) if lines else type(err).__name__


def _decode(stream: BinaryIO, image_size: int, resize: str) -> np.ndarray:
    """Every exception of Pillow, its plugins, EXIF parsing and conversion becomes an
    `UnreadableImage`: fuzzing finds ValueError, TypeError, struct.error, OSError, SyntaxError,
    IndexError, ... for single corrupt files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning, corrupt EXIF
        try:
            with Image.open(stream, formats=FORMATS) as image:
                return _rgb_square(_upright(_loaded(image)), image_size, resize)
        except UnreadableImage:
            raise
        except Image.UnidentifiedImageError:
            raise _unidentified(stream) from None
        except Image.DecompressionBombError:
            reason = f"too large: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
            raise UnreadableImage("too_large", reason) from None
        except Exception as err:
            reason = f"cannot decode image: {_one_line(err)}"
            raise UnreadableImage("decode_error", reason) from None


def _loaded(image: Image.Image) -> Image.Image:
    """`image` read into memory; above `MAX_PIXELS`, a JPEG at 1/2, 1/4 or 1/8 of its size."""
    width, height = image.size
    if width * height > MAX_PIXELS and image.format in _DOWNSCALED_WHILE_DECODING:
        scale = next((s for s in (2, 4) if width * height <= MAX_PIXELS * s * s), 8)
        image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
    if image.width * image.height > MAX_PIXELS:
        reason = (
            f"too large: {width} x {height} pixels, more than {MAX_PIXELS:,}"
            " (only JPEG is downscaled while decoding)"
        )
        raise UnreadableImage("too_large", reason)
    image.load()
    return image


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says. A malformed EXIF block (any exception while
    parsing it) leaves the image as stored rather than losing it."""
    try:
        method = _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation))
    except Exception:
        return image
    return image if method is None else image.transpose(method)


def _rgb_square(image: Image.Image, image_size: int, resize: str = "squash") -> np.ndarray:
    if image.mode == "F" or image.mode.startswith("I"):  # I, I;16, I;16B, ...
        image = _stretched(image)
    rgb = RESIZE[resize](_opaque(image), (image_size, image_size))
    return np.asarray(rgb, dtype=np.uint8)


RESIZE = {
    "squash": lambda image, size: image.resize(size, Image.Resampling.BICUBIC),
    "pad": lambda image, size: ImageOps.pad(image, size, Image.Resampling.BICUBIC),
    "center_crop": lambda image, size: ImageOps.fit(image, size, Image.Resampling.BICUBIC),
}


def _opaque(image: Image.Image) -> Image.Image:
    """`image` as RGB, its transparent parts (an alpha band, a palette's or a colour's
    transparency) composited on `BACKGROUND`."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, BACKGROUND)
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def _stretched(image: Image.Image) -> Image.Image:
    """High bit-depth grey as 8-bit grey, from its own darkest value (0) to its brightest (255).
    Float64: int32 values need more than float32's 24 bits."""
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", image.size)
    low = values.min(where=finite, initial=np.inf)
    high = values.max(where=finite, initial=-np.inf)
    np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)
    values -= low
    values *= 255 / (high - low) if high > low else 0
    return Image.fromarray(np.rint(values).astype(np.uint8))


def _unidentified(stream: BinaryIO) -> UnreadableImage:
    """Why none of `FORMATS` could open `stream`: it starts like one of them (corrupt), or it
    is another format Pillow knows (named by that format's header parser, which only reads the
    header: its pixels are never decoded), or nothing known."""
    stream.seek(0)
    prefix = stream.read(16)
    for name in FORMATS:
        if _accepts(Image.OPEN[name][1], prefix):
            return _unreadable_as(name, stream)
    try:
        with Image.open(stream) as other:
            reason = f"{other.format} content is not a supported image format ({SUPPORTED})"
            return UnreadableImage("unsupported_format", reason)
    except Exception:
        return UnreadableImage("unreadable", "not a readable image (unknown or corrupt format)")


def _unreadable_as(name: str, stream: BinaryIO) -> UnreadableImage:
    """Why `stream`, which starts like a `name` file, cannot be opened as one: its plugin's
    own reason, which tells a pixel layout Pillow lacks (float RGB TIFF) from corruption."""
    stream.seek(0)
    try:
        Image.OPEN[name][0](stream).close()
    except Exception as err:
        if str(err) == "unknown pixel mode":
            reason = (
                f"a {name} of a pixel layout that is not supported (e.g. floating-point colour)"
            )
            return UnreadableImage("unsupported_format", f"{reason}: save it as 8-bit RGB")
        return UnreadableImage(
            "unreadable", f"not a readable image (corrupt {name}: {_one_line(err)})"
        )
    return UnreadableImage("unreadable", f"not a readable image (corrupt {name})")


def _accepts(accept, prefix: bytes) -> bool:
    try:
        verdict = accept(prefix)
    except Exception:
        return False
    return bool(verdict) and not isinstance(verdict, str)  # a str is Pillow's warning text


def shorter_side(path: Path) -> int | None:
    """The shorter side of the image file at `path`, read from its header; None when the file
    is no image this module decodes (prepare says why when it decodes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path, formats=FORMATS) as image:
                return min(image.size)
        except Exception:
            return None
