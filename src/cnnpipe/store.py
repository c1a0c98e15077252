"""The on-disk formats shared by all stages, and writes that never leave half an output.

A split folder holds `<split>/images.npy` (uint8, N x H x W x 3, memory-mappable),
`<split>/labels.npy` (int64, N) and one `classes.json`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cnnpipe.errors import UserError, first_line
from cnnpipe.models import MODELS

SPLITS = ("train", "val", "test")
MAX_META_BYTES = 16 << 20  # a model's meta.json: its classes and settings (a few KiB)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, N x H x W x 3 (may be memory-mapped)
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@contextlib.contextmanager
def disk_full_is_one_line(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into a one-line `UserError` naming it, the space
    still free and (when known: `needed` bytes) the space the write needs."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(_disk_full(path, needed)) from None


def _free_bytes(path: Path) -> int:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return 0


def _disk_full(path: Path, needed: int | None) -> str:
    need = f", about {_size(needed)} needed" if needed else ""
    return (
        f"no space left on the disk writing {path} ({_size(_free_bytes(path))} free{need}):"
        " free some space and run again; nothing was replaced"
    )


def _size(size: int) -> str:
    return f"{size:,} bytes" if size < 1e6 else f"{size / 1e6:,.1f} MB"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces `final` only if the block finishes (a full disk
    is a one-line error, the temporary folder removed). Staging folders that killed
    processes left next to `final` are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with disk_full_is_one_line(final):
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    shutil.rmtree(retired, ignore_errors=True)


def remove_stale_staging(final: Path) -> None:
    """Remove `.<name>.tmp-<pid>` and `.<name>.old-<pid>` next to `final` whose process no
    longer runs: what a writer killed with SIGKILL (or a power cut) leaves behind."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-([0-9]+)")
    for path in final.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or _running(int(match[2])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_is_one_line(path, len(text.encode())):
            staging.write_text(text)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(path)


def save_tensors(state: dict, path: Path) -> None:
    """`torch.save(state, path)`; a full disk is a one-line error and leaves no partial file.
    Ctrl-C takes effect once the file is written: interrupted, torch's zip writer fails as it
    closes and its error would replace the KeyboardInterrupt."""
    import torch

    needed = sum(t.nbytes for t in _tensors(state))
    try:
        # through a Python file: a failed write is then an OSError with its errno
        with ctrl_c_after(), disk_full_is_one_line(path, needed), path.open("wb") as stream:
            torch.save(state, stream)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Ctrl-C during the block is raised as KeyboardInterrupt when it ends. Only where Python's
    own handler is in place, in the main thread: an ignored SIGINT (a background job) stays
    ignored."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def _tensors(value: object) -> Iterator:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def write_json_atomic(path: Path, payload: object) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> object:
    """A JSON file a stage wrote; damaged since (missing, cut short, not JSON), a one-line
    `UserError`."""
    try:
        return json.loads(path.read_bytes())
    except OSError as err:
        reason = err.strerror or first_line(err)
    except ValueError as err:  # JSON's errors and a text that is not UTF-8
        reason = f"not JSON: {first_line(err)}"
    raise UserError(f"{path} cannot be read ({reason}): {_RESTORE}")


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    with SplitWriter(folder / split, images.shape[1:]) as writer:
        writer.append(images, labels)


def rows_per_chunk(image_shape: tuple[int, ...], budget: int = 4 << 20) -> int:
    """How many images of `image_shape` make a chunk of about `budget` bytes (at most 256)."""
    return max(1, min(256, budget // int(np.prod(image_shape))))


class SplitWriter:
    """Writes one split folder as chunks of rows arrive, holding none of them: the images go
    to `images.npy` by plain appends, whose header gets the row count when the writer closes
    (numpy pads .npy headers so that the first dimension can change in place). Not through a
    memory map: pages written through a map count in the writer's resident memory until
    unmapped, so a large split would grow the process by its own size."""

    def __init__(self, folder: Path, image_shape: tuple[int, ...]):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.image_shape = tuple(image_shape)
        self.rows = 0
        self.labels: list[np.ndarray] = []
        self.images = (folder / "images.npy").open("wb")
        self.data_offset = self._write_header()

    def _write_header(self) -> int:
        header = {"descr": "|u1", "fortran_order": False, "shape": (self.rows, *self.image_shape)}
        np.lib.format.write_array_header_1_0(self.images, header)
        return self.images.tell()

    def append(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.shape[1:] != self.image_shape or len(images) != len(labels):
            raise ValueError(f"rows of shape {images.shape} do not fit {self.image_shape}")
        self.images.write(np.ascontiguousarray(images, dtype=np.uint8).data)
        self.labels.append(np.asarray(labels, dtype=np.int64))
        self.rows += len(images)

    def close(self) -> None:
        self.images.seek(0)
        if self._write_header() != self.data_offset:
            raise RuntimeError(f"{self.folder}: the .npy header changed length")
        self.images.close()
        np.save(self.folder / "labels.npy", np.concatenate([np.empty(0, np.int64), *self.labels]))

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:
            self.images.close()


def read_split(folder: Path, split: str) -> Split:
    """Images memory-mapped (read lazily), labels in memory. A split written by a stage and
    damaged since (a file missing, cut short, not an array, or images and labels that do not
    pair up) is a one-line `UserError`."""
    images = _read_array(folder / split / "images.npy", mmap_mode="r")
    labels = _read_array(folder / split / "labels.npy")
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise UserError(
            f"{folder / split}: {images.shape} images with {labels.shape} labels do not pair up:"
            f" {_RESTORE}"
        )
    return Split(images, labels)


_RESTORE = "restore it (dvc checkout) or rerun the stage that writes it (dvc repro --force)"


def _read_array(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap_mode)  # a pickled object is refused, not loaded
    except (OSError, ValueError, EOFError) as err:
        reason = getattr(err, "strerror", None) or first_line(err)  # OSError: without the path
        raise UserError(f"{path} cannot be read ({reason}): {_RESTORE}") from None


def image_size(folder: Path) -> int:
    """The side of the prepared images in `folder` (all splits share it)."""
    return int(read_split(folder, "train").images.shape[1])


def read_classes(folder: Path) -> list[str]:
    return list(read_json(folder / "classes.json"))


def fingerprint(*outputs: Path) -> str:
    """sha256 over the files of `outputs` (files or folders): each file's path (relative to the
    folder it is in) and bytes. Equal outputs, equal fingerprints."""
    digest = hashlib.sha256()
    for output in outputs:
        files = sorted(p for p in output.rglob("*") if p.is_file()) if output.is_dir() else [output]
        for path in files:
            digest.update(
                str(path.relative_to(output if output.is_dir() else path.parent)).encode()
            )
            with path.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


class Augmentation(BaseModel):
    """What the augment stage wrote besides its train split (`augmentation.json`): the policy
    the training stages draw train images through, and how that split is laid out.

    The split holds each original train image, then `views - 1` offline augmented copies of
    all of them, copy by copy: row `i + k * originals` is view `k` of image `i` (view 0 is the
    original). Code that needs an image's views asks `views_by_image`, never the file order."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy_dict: dict  # albumentations' `A.to_dict` of the policy
    on_the_fly: bool  # draw every train image through the policy each epoch
    originals: int = Field(ge=1)
    views: int = Field(ge=1)

    def policy(self):
        """The albumentations policy (seeded per epoch by the loop). OpenCV's own threads are
        turned off: on one small image at a time they cost more than they save (the scratch
        model's epoch on 32-px images runs ~10% faster; docs/benchmarks.md), and the pixels
        drawn are the same."""
        import albumentations as A
        import cv2

        cv2.setNumThreads(0)
        return A.from_dict(self.policy_dict)

    def views_by_image(self, rows):
        """Per-row values of the split (N x ...) as originals x views x ... ."""
        if len(rows) != self.originals * self.views:
            raise UserError(
                f"the augmented train split has {len(rows)} rows, not {self.originals} images "
                f"x {self.views} views: rerun the augment stage (dvc repro -f augment)"
            )
        return rows.reshape(self.views, self.originals, *rows.shape[1:]).transpose(0, 1)

    def originals_of(self, split: Split) -> Split:
        """The original images of the augmented train split (its first rows)."""
        return Split(split.images[: self.originals], split.labels[: self.originals])


def read_augmentation(path: Path) -> Augmentation:
    try:
        return Augmentation.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the augment stage (dvc repro augment)") from None
    except ValidationError as err:
        raise UserError(f"{path}: {err.errors()[0]['msg']} (rerun dvc repro augment)") from None


class PrivacySpent(BaseModel):
    """The differential-privacy guarantee of a model: its whole fit spent `epsilon` at `delta`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)


class ModelMeta(BaseModel):
    """`meta.json` of a model folder: how to rebuild the network and feed it images."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    architecture: str
    classes: list[str] = Field(min_length=2)
    image_size: int = Field(ge=8, le=512)
    input_size: int | None = Field(None, ge=16, le=512)  # transfer models: the backbone's size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    best_epoch: int = Field(ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # what it was trained in
    resize: Literal["squash", "pad", "center_crop"] = "squash"  # how its images became square
    # trained with DP-SGD (scratch models are then built without batch norm, networks.build)
    privacy: PrivacySpent | None = None
    pruned_at_epoch: int | None = Field(None, ge=1)  # a search trial's pruner stopped it here

    @field_validator("architecture")
    @classmethod
    def _known(cls, architecture: str) -> str:
        if architecture not in MODELS:
            raise ValueError(f"unknown architecture (known: {', '.join(MODELS)})")
        return architecture

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) < len(classes):
            raise ValueError("class names must be distinct")
        return classes

    @field_validator("std")
    @classmethod
    def _positive(cls, std: tuple[float, ...]) -> tuple[float, ...]:
        if min(std) <= 0:
            raise ValueError("every std must be above 0")
        return std


def write_model_folder(folder: Path, state_dict: dict, meta: ModelMeta) -> None:
    """A model folder: `weights.pt` (a state dict) and `meta.json` (how to rebuild and feed it)."""
    with atomic_dir(folder) as staging:
        save_tensors({k: v.detach().cpu() for k, v in state_dict.items()}, staging / "weights.pt")
        write_json(staging / "meta.json", meta.model_dump(mode="json", exclude_none=True))


def require_regular_file(path: Path, what: str) -> os.stat_result:
    """`path`'s status, when it is a regular file: a pipe or socket would block a read and a
    device (/dev/zero) would never end one, so they are a one-line `UserError` saying that
    `path` is no `what`. A missing path or a folder raises as `open` would."""
    status = path.stat()
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(status.st_mode):
        raise UserError(f"{path} is not a regular file (a pipe, socket or device), so no {what}")
    return status


def read_small_file(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of `path`, a regular file (`require_regular_file`) of at most `max_bytes`."""
    require_regular_file(path, what)
    with path.open("rb") as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{path} is over {max_bytes:,} bytes, too large for {what}")
    return data


def read_model_meta(folder: Path) -> ModelMeta:
    """The folder's `meta.json`, or a one-line `UserError` naming the file and the problem."""
    path = folder / "meta.json"
    try:
        return ModelMeta.model_validate_json(read_small_file(path, MAX_META_BYTES, "meta.json"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: {folder} is not a model folder") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a model's meta.json") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise UserError(f"{path}: {where}: {first['msg']} (retrain the model)") from None


def load_tensors(path: Path):
    """`torch.load` of a file that may come from anyone: `weights_only=True` (tensors and plain
    containers, never code), on the CPU, and without torch's warning about a pickle protocol
    it was not written with (a file of another protocol loads, or is refused, all the same)."""
    import torch

    require_regular_file(path, "tensor file")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(folder: Path) -> dict:
    """`weights.pt` as a state dict, unpickled with `weights_only=True`: a file holding anything
    but tensors is refused in one line, never run."""
    import pickle

    path = folder / "weights.pt"
    try:
        state_dict = load_tensors(path)
    except FileNotFoundError:
        raise UserError(f"{path} not found: {folder} is not a model folder") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        reason = first_line(err)[:200]
        raise UserError(f"{path} was refused: not a plain state dict ({reason})") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, float]]:
    """A numeric CSV written by `write_csv` (a history), as rows of floats."""
    with path.open(newline="") as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]
