"""The registered champion: the alias gate, `mlflow models serve`, `cnnpipe serve` and
`cnnpipe predict`."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnpipe import registry, store
from conftest import BIN, REPO
from shell import free_port, run
from test_images import check_predict_answers_each_file

pytestmark = pytest.mark.e2e

MODEL = "cnnpipe-classifier"


@pytest.fixture
def repo_store(digits_repo, monkeypatch) -> tuple[Path, MlflowClient]:
    uri = f"sqlite:///{digits_repo / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(digits_repo)
    return digits_repo, MlflowClient(uri)


def _test_split(repo: Path):
    test = store.read_split(repo / "data" / "prepared", "test")
    return np.asarray(test.images), test.labels, store.read_classes(repo / "data" / "prepared")


def wait_until_serving(server: subprocess.Popen, port: int) -> None:
    """Return once the model server answers /ping; one that exits or takes 120 s fails."""
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except OSError:
            assert server.poll() is None, server.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)


def test_the_first_record_made_the_chosen_model_champion(repo_store):
    repo, client = repo_store
    champion = client.get_model_version_by_alias(MODEL, "champion")
    experiment = client.get_experiment_by_name("cnnpipe").experiment_id
    (pipeline,) = client.search_runs([experiment], "tags.`cnnpipe.stage` = 'pipeline'")
    note = pipeline.data.tags["mlflow.note.content"]
    assert f"version {champion.version} of `{MODEL}` is the first champion" in note
    report = (repo / "reports" / "report.md").read_text()
    metrics = json.loads((repo / "reports" / "evaluate" / "metrics.json").read_text())
    best = max(metrics["accuracy"], key=metrics["accuracy"].get)
    assert f"**Chosen model: {best} " in report
    assert float(champion.tags["test_accuracy"]) == metrics["accuracy"][best]


def test_served_champion_answers_http_requests(repo_store):
    repo, _ = repo_store
    images, labels, classes = _test_split(repo)
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=repo,
        env=os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_serving(server, port)
        shown = np.arange(0, len(labels), 12)
        cells = []  # base64 PNG files of another size, and raw H x W x 3 pixel arrays
        for i in shown:
            buffer = io.BytesIO()
            Image.fromarray(images[i]).resize((48, 48)).save(buffer, format="PNG")
            cells.append([base64.b64encode(buffer.getvalue()).decode()])
            cells.append([images[i].tolist()])
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": cells}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        not_an_image = base64.b64encode(b"hello, this is text").decode()
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[not_an_image]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=bad.encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        error = json.loads(refused.value.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    predicted = [row["class"] for row in answer]
    expected = [classes[labels[i]] for i in shown for _ in range(2)]
    assert np.mean([p == e for p, e in zip(predicted, expected, strict=True)]) >= 0.8
    for row in answer:  # the class and its probability are the most likely of the columns
        scores = {name: row[f"probability:{name}"] for name in classes}
        assert row["class"] == max(scores, key=scores.get)
        assert row["probability"] == scores[row["class"]] and sum(scores.values()) == pytest.approx(
            1
        )
    assert refused.value.code == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "cannot read an image: image 0:" in error["message"], error
    assert "stack_trace" not in error and "Traceback" not in json.dumps(error)


def post(port: int, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_cnnpipe_serve_answers_json_and_parquet_and_refuses_the_rest_without_a_trace(repo_store):
    """The same requests as `mlflow models serve`; a CSV body, which cannot carry images, is
    refused with what to send, and a body MLflow cannot parse is an error without its stack
    trace. Ctrl-C stops the server with one line."""
    repo, _ = repo_store
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "cnnpipe"), "serve", "--port", str(port)],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until_serving(server, port)
        png = (REPO / "samples" / "digit-7.png").read_bytes()
        not_an_image = base64.b64encode(os.urandom(1_000_000)).decode()  # MLflow quotes it
        split = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}
        }
        parquet = io.BytesIO()
        pd.DataFrame({"image": [png, png]}).to_parquet(parquet)
        answers = [
            post(port, json.dumps(split).encode(), "application/json"),
            post(port, parquet.getvalue(), "application/vnd.apache.parquet"),
        ]
        refused = [
            post(port, f"image\n{split['dataframe_split']['data'][0][0]}\n".encode(), "text/csv"),
            post(port, b"{not json", "application/json"),
            post(port, b"not parquet", "application/vnd.apache.parquet"),
            post(port, b"[" * 100_000 + b"]" * 100_000, "application/json"),
            post(port, json.dumps({"inputs": [not_an_image]}).encode(), "application/json"),
        ]
    finally:
        os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground job
        out, err = server.communicate(timeout=30)
    assert [status for status, _ in answers] == [200, 200]
    assert [row["class"] for row in answers[0][1]["predictions"]] == ["7"]
    assert len(answers[1][1]["predictions"]) == 2
    assert [status for status, _ in refused] == [415, 400, 400, 400, 400]
    said = [error["message"] for _, error in refused]
    assert "CSV bodies cannot carry images: send JSON" in said[0]
    assert "valid JSON" in said[1] and "Parquet" in said[2] and "nested too deeply" in said[3]
    assert said[4] == (  # MLflow's quote of the whole request (1.3 MB) is dropped
        "Failed to predict: cannot read an image: image 0: not a readable image "
        "(unknown or corrupt format)"
    )
    assert not any(
        "stack_trace" in error or "Traceback" in json.dumps(error) for _, error in refused
    )
    assert server.returncode == 0 and out.splitlines()[-1] == "model server stopped"
    assert "Traceback" not in err
    assert err.splitlines() == [  # the version that answers, then one line per failure
        "model: cnnpipe-classifier version 1 (@champion)",
        "cnnpipe serve: a request failed (RecursionError: maximum recursion depth exceeded "
        "while decoding a JSON array from a unicode string)",
    ], err


def test_predict_answers_each_file_and_reports_unreadable_ones(repo_store, tmp_path):
    repo, _ = repo_store
    images, labels, classes = _test_split(repo)
    good = tmp_path / "digit.png"
    Image.fromarray(images[0]).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no jpeg here")
    for extra in ([], ["--model", "models/scratch"]):
        result = run(
            [str(BIN / "cnnpipe"), "predict", *extra, str(good), str(broken)], repo, expect=1
        )
        lines = result.stdout.strip().splitlines()
        assert (
            lines[0].startswith(f"{good}: ") and lines[0].split(": ")[1].split(" (")[0] in classes
        )
        assert lines[1] == f"{broken}: error: not a readable image (unknown or corrupt format)"


def test_predict_without_a_champion_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = subprocess.run(
        [str(BIN / "cnnpipe"), "predict", "x.png"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert "no champion of 'cnnpipe-classifier'" in line
    assert "dvc repro -f -s record" in line
    assert registry.champion(MODEL) is None


def test_predict_answers_hostile_files_in_one_line_each(repo_store, tmp_path):
    repo, _ = repo_store
    check_predict_answers_each_file(repo / "models" / "scratch", repo, tmp_path)
