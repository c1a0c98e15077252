"""The real `dvc`, `cnnpipe`, `mlflow` and `git` commands, run in a test repository."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cnnpipe import tracking

BIN = Path(sys.executable).parent
# Longer than any one command of the suite takes here (a tiny `dvc repro`: about a minute).
COMMAND_TIMEOUT_S = 600
# Settings of the developer's shell that would send a test's runs or data elsewhere.
OUTSIDE = ("MLFLOW_TRACKING_URI", "DVC_REMOTE_URL", "GITHUB_STEP_SUMMARY", "DVC_EXP_NAME")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env | extra


def run(
    command: list[str],
    cwd: Path,
    expect: int | None = 0,
    timeout_s: float = COMMAND_TIMEOUT_S,
    **extra_env: str,
) -> subprocess.CompletedProcess:
    """Run `command` (a venv executable by name, or anything on PATH); check its exit status
    is `expect` (any status with None).

    Output goes to files, not pipes: a daemon the command leaves behind (`dvc queue start`
    forks its workers with our descriptors) would otherwise hold the pipes open and block us
    until it exits. A command still running after `timeout_s` is killed with its process
    group, and the test fails with what it printed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=environment(**extra_env),
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            timed_out = True
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    assert not timed_out, (
        f"{command} still ran after {timeout_s:.0f} s:\n{result.stdout}{result.stderr}"
    )
    assert expect is None or result.returncode == expect, result.stdout + result.stderr
    return result


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


def _worker_ports() -> Iterator[int]:
    """Ports below the kernel's ephemeral range (32768+), a block of 1,000 per pytest-xdist
    worker: a port the OS hands out for bind(0) can be handed to another worker too while a
    server here is still starting, and the other worker's server would then answer for it."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    return iter(range(20000 + 1000 * worker, 21000 + 1000 * worker))


PORTS = _worker_ports()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, from this test process's own block."""
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this worker's block")


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` on 127.0.0.1: SQLite backend, artifacts served from `folder`.
    Yields its URI and process; killed (with its workers) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{free_port()}"
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            uri.rsplit(":", 1)[1],
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        env=environment(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no GenAI job workers
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while tracking.server_unreachable(uri):
            assert process.poll() is None, (folder / "server.log").read_text()
            assert time.monotonic() < deadline, (folder / "server.log").read_text()
            time.sleep(0.5)
        yield uri, process
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen) -> None:
    """Kill a server started by `mlflow_server`, and the workers in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: pgid == pid
    process.wait()
