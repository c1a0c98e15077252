"""The repository as the benchmarks measure it: a fresh git repository in a scratch folder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_repo(target: Path) -> Path:
    """The repository's files as git sees them (tracked, and untracked but not ignored), as a
    fresh git repository at `target`, committed: the working tree is measured, committed or
    not."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=target, check=True)
    commit(target, "copy")
    return target


def commit(repo: Path, message: str) -> None:
    """Commit everything in `repo` (as a throwaway author)."""
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", message],
        cwd=repo,
        check=True,
        stdout=subprocess.DEVNULL,
    )
