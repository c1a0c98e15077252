"""Shared fixtures: small real image folders, a private MLflow store, a scratch working dir."""

from __future__ import annotations

import os

# One pytest-xdist worker runs per core, so each worker, and every process it starts, gets its
# share of the cores for torch's and scikit-learn's OpenMP threads: with more, their threads
# spin-wait on each other's cores (two tiny pipelines side by side took 63 s with two threads
# each, 36 s with one, as long as one alone). Set before torch or scikit-learn is imported.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock
from PIL import Image
from sklearn.datasets import load_digits

# cnnpipe.serving imports mlflow.pyfunc without MLflow's own import-time warning; imported
# here, before any test module imports MLflow's scoring server directly.
import cnnpipe.serving  # noqa: F401
from cnnpipe.params import preset
from shell import commit, run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: dvc, cnnpipe, mlflow
# Session fixtures that reproduce a whole pipeline, are used in place (tests run stages and
# write MLflow runs in them) and so are built once per test process, with every test that
# reads one on that process. `faces_baseline`, which tests only read or copy, is instead
# built once for all the processes.
REPRODUCED = ("digits_repo",)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the end-to-end tests for pytest-xdist (`--dist loadgroup`, in pyproject.toml): a
    module's tests stay together (they share its module fixtures), and so do all the modules
    that read a reproduced repository in `REPRODUCED`, so it is built by one worker only
    (xdist hands out the groups with the most tests first)."""
    reads = defaultdict(set)
    for item in items:
        reads[item.module.__name__] |= set(REPRODUCED) & set(item.fixturenames)
    for item in items:
        if item.get_closest_marker("e2e"):
            module = item.module.__name__
            item.add_marker(pytest.mark.xdist_group(min(reads[module], default=module)))


def digit_images(digit: int, count: int, size: int = 24) -> list[Image.Image]:
    """Real handwritten digits from scikit-learn, as RGB PIL images."""
    digits = load_digits()
    chosen = digits.images[digits.target == digit][:count]
    return [
        Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").resize((size, size))
        for image in chosen
    ]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of real digit images saved in every supported format and several modes."""
    root = tmp_path / "images"
    formats = [
        ("png", "RGB"),
        ("jpg", "L"),
        ("bmp", "RGB"),
        ("gif", "P"),
        ("webp", "RGB"),
        ("tiff", "RGBA"),
    ]
    for digit, name in [(0, "zero"), (1, "one"), (7, "seven")]:
        (root / name).mkdir(parents=True)
        for i, image in enumerate(digit_images(digit, 12)):
            suffix, mode = formats[i % len(formats)]
            image.convert(mode).save(root / name / f"{i:02d}.{suffix}")
    return root


@pytest.fixture(scope="module")
def module_mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(module_mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI for the test: one SQLite store per test module (creating one costs
    seconds); tests tell their runs apart by experiment, stage and fingerprint."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", module_mlflow_uri)
    return module_mlflow_uri


def write_params(folder: Path, overrides: dict[str, object]) -> None:
    """params.yaml in `folder`: the repository's with `overrides` (`section.key` -> value, as
    `dvc exp run -S` takes them) set."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        table = params
        for section in sections:
            table = table[section]
        table[leaf] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


TINY = preset("tiny", REPO / "presets")
# TINY on 200 LFW crops instead of 1,797 digits: for tests about DVC and MLflow, not accuracy.
FACES = TINY | {"data.source": "builtin:faces"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> Path:
    """A scratch working directory with tiny params, as a stage process would see it."""
    folder = tmp_path / "work"
    folder.mkdir()
    write_params(folder, TINY)
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The repository's committed files copied into a fresh git + DVC repo."""
    return copy_repo(tmp_path / "repo")


def copy_repo(target: Path) -> Path:
    """The repository's tracked files (as they are in the worktree) in a fresh git repo at
    `target`, on branch main, committed."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(command, cwd=target, check=True)
    return target


def repro_tiny(target: Path) -> Path:
    repo = copy_repo(target)
    write_params(repo, TINY)
    run([str(BIN / "dvc"), "repro"], repo)
    return repo


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory) -> Path:
    """One tiny `dvc repro` of the default pipeline, shared by every test that reads it."""
    return repro_tiny(tmp_path_factory.mktemp("digits") / "repo")


@pytest.fixture(scope="session")
def faces_baseline(tmp_path_factory, worker_id: str) -> Path:
    """One tiny `dvc repro` on builtin:faces, committed with its dvc.lock as the baseline,
    its MLflow store removed. Tests only read it, or take a private copy (`faces_repo`), so
    the pytest-xdist workers share one: the first to ask builds it, in the run's temporary
    folder, while the others wait for it."""
    if worker_id == "master":  # one process: pytest caches the session fixture
        return reproduce_faces(tmp_path_factory.mktemp("faces") / "repo")
    run_folder = tmp_path_factory.getbasetemp().parent  # each worker's folder is inside it
    repo, built = run_folder / "faces" / "repo", run_folder / "faces" / "built"
    with FileLock(run_folder / "faces.lock"):
        if not built.exists():
            reproduce_faces(repo)
            built.touch()
    return repo


def reproduce_faces(target: Path) -> Path:
    repo = copy_repo(target)
    write_params(repo, FACES)
    run([str(BIN / "dvc"), "repro"], repo)
    shutil.rmtree(repo / "mlruns")
    for store in ("mlflow.db", "mlflow.db.lock"):
        (repo / store).unlink(missing_ok=True)
    commit(repo, "baseline")
    return repo


@pytest.fixture
def faces_repo(faces_baseline: Path, tmp_path: Path) -> Path:
    """A private copy of the reproduced faces baseline: git history, DVC cache and outputs."""
    return Path(shutil.copytree(faces_baseline, tmp_path / "repo", symlinks=True))
