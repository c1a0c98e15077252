"""Services that answer wrongly end in one line: a tracking server that answers HTML or
stalls, a registry that fails (not "no champion"), and the served model, which answers every
JSON shape MLflow accepts and refuses the rest with a 4xx JSON error without a stack trace."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import socket
import threading
import time
from collections.abc import Iterator

import mlflow
import pytest
from mlflow.pyfunc.scoring_server import invocations
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnpipe import cli, registry, tracking
from cnnpipe.errors import UserError
from conftest import REPO
from test_registry import logged_run


@contextlib.contextmanager
def answering(answer) -> Iterator[str]:
    """A real HTTP server on loopback whose every GET is answered by `answer(path)`: (status,
    content type, body), or None to stall."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            reply = answer(self.path)
            if reply is None:
                time.sleep(10)
                return
            status, content_type, body = reply
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


LOGIN_PAGE = (200, "text/html", b"<!doctype html><html><body>Sign in</body></html>")


def test_a_login_page_is_one_line_naming_the_uri_and_what_it_answered(monkeypatch):
    with answering(lambda path: LOGIN_PAGE) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(UserError) as error:
            tracking.check_server()
    message = str(error.value)
    assert uri in message and "text/html instead of MLflow's JSON" in message
    assert "Sign in" in message and "\n" not in message


def test_a_server_whose_api_stalls_is_one_line_within_the_deadline(monkeypatch):
    monkeypatch.setattr(tracking, "HEALTH_TIMEOUT_S", 1)
    with answering(lambda path: None) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with pytest.raises(UserError, match="no answer to an API call within 1 s"):
            tracking.check_server()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("uri", ["ftp://example.org/mlruns", "file:///tmp/mlruns", "mlruns"])
def test_a_uri_of_no_usable_store_is_one_line(monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError, match=f"MLFLOW_TRACKING_URI {uri} is not a store"):
        tracking.check_server()


def registry_answering(error_code: str, status: int):
    def answer(path: str):
        if "experiments/search" in path:
            return 200, "application/json", b'{"experiments": []}'
        body = json.dumps({"error_code": error_code, "message": "as told"}).encode()
        return status, "application/json", body

    return answer


def test_a_failing_registry_is_not_no_champion(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with answering(registry_answering("RESOURCE_DOES_NOT_EXIST", 404)) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert registry.champion("cnnpipe-classifier") is None
        with pytest.raises(UserError, match="no champion of 'cnnpipe-classifier'"):
            registry.champion_uri("cnnpipe-classifier")
    with answering(registry_answering("INTERNAL_ERROR", 500)) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(UserError) as error:
            registry.champion("cnnpipe-classifier")
    message = str(error.value)
    assert message.startswith(f"the model registry in {uri} failed while looking up the champion")
    assert "500" in message and "\n" not in message


# Logging a model into a fresh store takes seconds: the served-model tests are end-to-end.
@pytest.fixture(scope="module")
def served(tmp_path_factory, module_mlflow_uri):
    """A logged model as MLflow's scoring server loads it."""
    folder = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", module_mlflow_uri)
        patch.chdir(folder)
        run_id = logged_run(folder / "model", "served")
        [logged] = MlflowClient().search_logged_models(
            experiment_ids=[mlflow.get_experiment_by_name("served").experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
        )
        model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    return model, model.metadata.get_input_schema()


def png_text(size: tuple[int, int] = (20, 20)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def ask(served, body: dict, content_type: str = "application/json"):
    model, schema = served
    try:
        answer = invocations(json.dumps(body), content_type, model, schema)
    except mlflow.exceptions.MlflowException as error:
        return error.get_http_status_code(), json.loads(error.serialize_as_json())
    return answer.status, json.loads(answer.response)


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["image"], "data": [["PNG"], ["PNG"]]}},
        {"dataframe_records": [{"image": "PNG"}, {"image": "PNG"}]},
        {"instances": ["PNG", "PNG"]},
        {"instances": [{"image": "PNG"}, {"image": "PNG"}]},
        {"inputs": {"image": ["PNG", "PNG"]}},
        {"inputs": ["PNG", "PNG"]},
        {"inputs": {"image": [[[[0, 0, 0]] * 5] * 5, [[[9, 9, 9]] * 3] * 4]}},
    ],
    ids=["split", "records", "instances", "instance records", "inputs", "inputs list", "pixels"],
)
@pytest.mark.e2e
def test_every_json_shape_mlflow_accepts_is_answered(served, body):
    text = json.dumps(body).replace('"PNG"', json.dumps(png_text()))
    status, answer = ask(served, json.loads(text))
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    assert {"class", "probability", "probability:no", "probability:yes"} == set(
        answer["predictions"][0]
    )


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"dataframe_split": {"columns": ["image"], "data": []}}, "the request holds no image"),
        ({"inputs": {"image": ["BIG"] * 3}}, "more than 100,000,000: send fewer or smaller"),
        ({"inputs": {"image": ["bm90IGFuIGltYWdl"]}}, "cannot read an image: image 0:"),
        ({"dataframe_split": {"columns": ["x"], "data": [[1]]}}, "missing inputs ['image']"),
    ],
    ids=["empty", "pixel budget", "not an image", "no image column"],
)
@pytest.mark.e2e
def test_bad_requests_are_a_4xx_json_error_without_a_stack_trace(served, body, said):
    text = json.dumps(body).replace('"BIG"', json.dumps(png_text((8000, 5000))))
    status, answer = ask(served, json.loads(text))
    assert 400 <= status < 500 and said in answer["message"], answer
    assert "stack_trace" not in answer


def test_a_store_that_is_no_database_is_one_line(tmp_path, monkeypatch, capsys):
    """For the registry and for every command that opens the store: a stage, the UI."""
    store = tmp_path / "mlflow.db"
    store.write_bytes(bytes(range(256)) * 20)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with pytest.raises(UserError, match="file is not a database"):
        registry.champion("cnnpipe-classifier")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    for command in (["prepare"], ["ui", "--port", "5999"]):
        assert cli.main(command) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"cnnpipe {command[0]}: error: the MLflow store sqlite:///")
        assert "file is not a database" in line and "move it aside" in line


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_a_port_that_is_taken_or_no_port_is_one_line(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing is looked up before the port is checked
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--port", "70000"])
    assert exited.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("'70000' is not a port: give a number 1-65535")
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert cli.main([command, "--port", str(port)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"cnnpipe {command}: error: cannot listen on 127.0.0.1:{port} (")
    assert line.endswith("choose another --port")


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("postgresql+psycopg://u@127.0.0.1:{port}/db", "Connection refused"),
        ("sqlite:///{folder}", "is not a file"),
    ],
    ids=["no database server", "a folder"],
)
def test_a_database_store_that_cannot_be_opened_is_one_line_at_once(tmp_path, uri, said):
    """MLflow would try ten times over about 100 s, warning at each try."""
    with socket.socket() as closed:  # a free port with nothing listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    uri = uri.format(port=port, folder=tmp_path)
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(UserError) as error:
            tracking.client()
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert message.startswith(f"the MLflow store {uri} cannot be opened (") and said in message
