"""`cnnpipe retrain`: the retraining steps CI runs, runnable on any machine.

1. with a DVC remote (`--remote URL`, `$DVC_REMOTE_URL`, or one already configured):
   `dvc pull` what the current `dvc.lock` names; without one, skip it (data is rebuilt);
2. `dvc exp run -S key=value ...` in the workspace: writes the overrides into params.yaml and
   reruns the stages they affect, leaving the results (and a new dvc.lock) in the workspace;
3. with a remote: `dvc push` the new outputs;
4. `dvc params diff` and `dvc metrics diff` against `main` (or HEAD where there is no main),
   plus `reports/report.md` when the pipeline writes one, as a Markdown summary appended to
   `$GITHUB_STEP_SUMMARY`, or written to `--summary FILE`, or printed.

The remote given by URL is added to `.dvc/config.local` (never committed), as `ci`.
Overrides are checked first: a misspelt key or a wrong value stops before step 1, in one line,
with nothing written; so does an unreachable MLflow server (`MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cnnpipe import tracking
from cnnpipe.errors import UserError
from cnnpipe.layout import REPORT
from cnnpipe.params import with_overrides_checked

REMOTE_NAME = "ci"
BASELINES = ("main", "origin/main", "HEAD")


def say(line: str) -> None:
    print(f"retrain: {line}", flush=True)


def dvc(*args: str, capture: bool = False) -> str:
    """Run `dvc args`; its output goes to the terminal unless captured. A failure is a one-line
    error (DVC has already printed why)."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], capture_output=capture, text=True, check=False
    )
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if capture else []
        raise UserError(
            f"`dvc {' '.join(args)}` failed with exit {result.returncode}"
            + (f": {detail[0]}" if detail else "")
        )
    return result.stdout or ""


def use_remote(url: str | None) -> bool:
    """Make `url` the default remote (local config only); say whether any remote is set."""
    if url:
        dvc("remote", "add", "--local", "--force", "--default", REMOTE_NAME, url)
        return True
    return bool(dvc("remote", "list", capture=True).strip())


def baseline() -> str:
    for rev in BASELINES:
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
            capture_output=True,
            check=False,
        )
        if found.returncode == 0:
            return rev
    raise UserError("not a git repository with a commit: retrain compares against main or HEAD")


def summary(overrides: list[str], rev: str) -> str:
    """Params and metrics against `rev` (all metrics where none differ), then the report."""
    params = dvc("params", "diff", rev, "--md", capture=True).strip()
    metrics = dvc("metrics", "diff", rev, "--md", capture=True).strip()
    lines = [
        "## cnnpipe retrain",
        "",
        f"Overrides: {', '.join(f'`{o}`' for o in overrides) or 'none'}; compared with `{rev}`.",
        "",
        "### Params changed",
        "",
        params or "none",
        "",
        "### Metrics",
        "",
        metrics or dvc("metrics", "show", "--md", capture=True).strip(),
    ]
    if REPORT.is_file():
        lines += ["", REPORT.read_text().strip()]
    return "\n".join(lines) + "\n"


def write_summary(text: str, target: Path | None) -> None:
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a") as out:
            out.write(text)
        say(f"summary appended to $GITHUB_STEP_SUMMARY ({step_summary})")
    elif target:
        target.write_text(text)
        say(f"summary written to {target}")
    else:
        print(text)


def run(overrides: list[str], remote_url: str | None, summary_file: Path | None) -> None:
    with_overrides_checked(overrides)  # before anything is pulled, written or run
    tracking.check_server()
    rev = baseline()
    has_remote = use_remote(remote_url)
    if has_remote:
        say("dvc pull (outputs the remote lacks are rebuilt)")
        dvc("pull", "--allow-missing")
    else:
        say("skip dvc pull: no DVC remote configured (give --remote or set DVC_REMOTE_URL)")
    say(f"dvc exp run {' '.join(f'-S {o}' for o in overrides)}".rstrip())
    dvc("exp", "run", *(arg for o in overrides for arg in ("-S", o)))
    if has_remote:
        say("dvc push")
        dvc("push")
    else:
        say("skip dvc push: no DVC remote configured")
    say(f"compare with {rev}")
    write_summary(summary(overrides, rev), summary_file)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cnnpipe retrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--set",
        "-S",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override, e.g. train.epochs=20",
    )
    parser.add_argument(
        "--remote",
        default=os.environ.get("DVC_REMOTE_URL") or None,
        help="DVC remote URL (s3://, gs://, ssh://, a folder); default $DVC_REMOTE_URL",
    )
    parser.add_argument(
        "--summary",
        type=Path,
        help="write the summary here (default: $GITHUB_STEP_SUMMARY, else stdout)",
    )
    args = parser.parse_args(argv)
    try:
        run(args.overrides, args.remote, args.summary)
    except UserError as err:
        print(f"cnnpipe retrain: error: {err}", file=sys.stderr)
        return 2
    return 0
