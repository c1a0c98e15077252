"""`cnnpipe ui`: MLflow's UI on the repository's store, opening in its Model training view,
stopped by one Ctrl-C with one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO
from shell import environment, free_port

pytestmark = pytest.mark.e2e


def processes_in(folder: Path) -> dict[int, str]:
    """The running processes whose working directory is `folder`, with their command lines:
    the UI and everything it started (none of them changes directory)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if Path(os.readlink(entry / "cwd")) == folder:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found[int(entry.name)] = command
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
    return found


def kill_all(processes: dict[int, str]) -> None:
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


STOPS = {  # how a UI is stopped: a signal, and whether it goes to the job or to cnnpipe alone
    "Ctrl-C": (signal.SIGINT, True),  # a terminal sends it to the foreground job
    "kill": (signal.SIGTERM, False),
    "closed terminal": (signal.SIGHUP, False),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_the_ui_opens_in_model_training_and_stopping_it_stops_all_it_started(tmp_path, stop):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    port = free_port()
    ui = subprocess.Popen(
        ["cnnpipe", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell's foreground job
    )
    try:
        wait_until_it_answers(ui, port)
        assert_first_visit_defaults(f"http://127.0.0.1:{port}/")
        stop_by(ui, tmp_path, *STOPS[stop])
    finally:  # a failed check leaves nothing running
        kill_all(processes_in(tmp_path))


def wait_until_it_answers(ui: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while not answers(f"http://127.0.0.1:{port}/"):
        assert ui.poll() is None and time.monotonic() < deadline, ui.communicate()
        time.sleep(0.5)


def assert_first_visit_defaults(start_page: str) -> None:
    """The start page sets Model training (and a closed assistant) in a browser's storage
    before MLflow's code reads it, even when the browser asks whether its copy is current."""
    request = urllib.request.Request(start_page, headers={"If-None-Match": '"any"'})
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    script = page[page.index("<script>") : page.index("</script>")]
    assert page.index("<script>") < page.index('src="static-files/static/js/main.')
    assert f"{json.dumps('mlflow.workflowType_v1')}:{json.dumps('machine_learning')}" in script
    assert "localStorage.getItem(k)===null" in script  # a user's own choice is kept


def stop_by(ui: subprocess.Popen, folder: Path, signum: int, to_the_job: bool) -> None:
    assert len(processes_in(folder)) >= 2  # cnnpipe and the server it started

    stopped_at = time.monotonic()
    if to_the_job:
        os.killpg(ui.pid, signum)
    else:
        ui.send_signal(signum)
    out, err = ui.communicate(timeout=10)
    while processes_in(folder) and time.monotonic() < stopped_at + 5:
        time.sleep(0.1)
    assert not processes_in(folder), f"outlived {signum!r} by 5 s: {processes_in(folder)}"
    assert ui.returncode == 0
    assert out.splitlines()[-1] == "MLflow UI stopped"
    assert "Traceback" not in err and "huey" not in err, err
