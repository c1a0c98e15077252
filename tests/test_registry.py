"""The champion gate against a temporary SQLite store, with real logged models."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnpipe import layout, networks, registry, serving, store, tracking
from cnnpipe.errors import UserError

NAME = "gate-test"


def logged_run(folder: Path, experiment: str) -> str:
    """A finished run that logged a small real model (seed_cnn, two classes)."""
    torch.manual_seed(0)
    network = networks.build("seed_cnn", num_classes=2, image_size=16)
    meta = store.ModelMeta(
        architecture="seed_cnn",
        classes=["no", "yes"],
        image_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        best_epoch=1,
    )
    target = layout.TrainedModel("scratch", "train", folder, folder / "reports")
    store.write_model_folder(folder, network.state_dict(), meta)
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with tracking.stage_run("train", experiment, {"lr": 0.1}, model="seed_cnn") as run:
        run.log_model(target, images)
    return run.run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_mlflow_uri) -> list[str]:
    folder = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", module_mlflow_uri)
        patch.chdir(folder)
        return [logged_run(folder / f"model{i}", "registry") for i in range(3)]


def candidate(run_id: str, score: float, data_hash: str = "data-a") -> registry.Candidate:
    return registry.Candidate(
        run_id, "accuracy", score, data_hash, {"architecture": "seed_cnn"}, f"score {score}"
    )


def never_measured(version) -> float | None:
    raise AssertionError("the champion's tags hold its score on this data")


def test_the_gate_moves_the_champion_only_on_improvement(runs, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(mlflow_store)
    first = registry.promote(NAME, candidate(runs[0], 0.8), never_measured)
    assert first == f"version 1 of `{NAME}` is the first champion (test accuracy 0.8000)."
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.tags["test_accuracy"] == "0.8" and version.tags["data_hash"] == "data-a"
    assert version.description == "score 0.8"
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    listed = json.loads(logged.tags["mlflow.modelVersions"])  # its page: "registered", version 1
    assert listed == [{"name": NAME, "version": version.version}]
    assert client.get_registered_model(NAME).description.startswith("cnnpipe's image classifier")

    again = registry.promote(NAME, candidate(runs[0], 0.8), never_measured)
    assert again == f"version 1 of `{NAME}` (this model) is already the champion."

    worse = registry.promote(NAME, candidate(runs[1], 0.7), never_measured)
    assert worse.startswith("champion stays version 1: its test accuracy 0.8000")
    assert client.get_model_version_by_alias(NAME, "champion").version == 1

    better = registry.promote(NAME, candidate(runs[2], 0.9), never_measured)
    assert better.startswith("champion moved to version 3: test accuracy 0.9000 beats")
    assert client.get_model_version_by_alias(NAME, "champion").run_id == runs[2]


def test_a_champion_measured_on_other_data_is_measured_again(
    runs, mlflow_store, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    name = "gate-other-data"
    registry.promote(name, candidate(runs[0], 0.8, "data-a"), never_measured)
    measured = []

    def measure(version) -> float:
        measured.append(version.version)
        return 0.95

    note = registry.promote(name, candidate(runs[1], 0.9, "data-b"), measure)
    assert measured == [1]
    assert note.startswith("champion stays version 1: its test accuracy 0.9500")

    unlike = registry.promote(name, candidate(runs[2], 0.99, "data-c"), lambda version: None)
    assert unlike.startswith("champion moved to version 3 without a comparison: version 1 was")
    assert "trained on other classes" in unlike
    assert str(registry.champion(name).version) == "3"


def test_a_score_that_is_not_a_number_is_never_registered(
    runs, mlflow_store, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    note = registry.promote("gate-nan", candidate(runs[0], math.nan), never_measured)
    assert note == "not registered: its test accuracy is not a number (nan)."
    assert registry.champion("gate-nan") is None


def test_the_champion_loads_as_data(runs, mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry.promote("gate-load", candidate(runs[0], 0.5), never_measured)
    classifier = serving.load(registry.champion_uri("gate-load"))
    assert classifier.meta.classes == ["no", "yes"]
    answer = classifier.predict(np.zeros((3, 20, 20, 3), dtype=np.uint8))
    columns = ["class", "probability", "probability:no", "probability:yes"]
    assert list(answer.columns) == columns and len(answer) == 3


def test_no_champion_is_a_clear_error(mlflow_store):
    with pytest.raises(UserError, match="no champion of 'nobody'.*dvc repro -f -s record"):
        registry.champion_uri("nobody")


class Payload:
    """Unpickling this runs a command: what a tampered model file would try."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_logged_model_runs_no_code(runs, mlflow_store, tmp_path, monkeypatch):
    """Every file of a logged model replaced in turn by something that would run code if
    loaded: a pickle, YAML with a Python tag, an MLmodel naming another loader. Loading either
    fails with one line or ignores the file; the marker is never created."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"
    registry.promote("gate-tamper", candidate(runs[0], 0.5), never_measured)
    uri = registry.champion_uri("gate-tamper")
    client = tracking.client()
    model_id = client.get_model_version("gate-tamper", 1).source.removeprefix("models:/")
    stored = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)
    files = sorted(p for p in stored.rglob("*") if p.is_file())
    assert {"MLmodel", "weights.pt", "meta.json"} <= {p.name for p in files}
    payloads = {
        "pickle": pickle.dumps(Payload(marker)),
        "yaml": f"!!python/object/apply:os.system ['touch {marker}']\n".encode(),
        "loader": b"flavors:\n  python_function:\n    loader_module: os\n    data: data\n",
    }
    refused = set()
    for path in files:
        original = path.read_bytes()
        for payload in payloads.values():
            path.write_bytes(payload)
            try:
                serving.load(uri).predict(np.zeros((1, 16, 16, 3), dtype=np.uint8))
            except UserError as err:
                assert "\n" not in str(err)
                refused.add(path.name)
            assert not marker.exists(), f"{path.name} ran code"
        path.write_bytes(original)
    assert {"MLmodel", "weights.pt", "meta.json"} <= refused
