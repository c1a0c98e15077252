"""End to end: the real `dvc repro` on a copy of the repository, checked through MlflowClient."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cnnpipe import store
from conftest import BIN, TINY, write_params
from shell import run

pytestmark = pytest.mark.e2e

STAGES = ("prepare", "augment", "train", "transfer", "evaluate")
RUNS = (*STAGES, "pipeline")  # record's run is the pipeline run


def runs_by_stage(repo: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe")
    runs = client.search_runs([experiment.experiment_id])
    return {s: [r for r in runs if r.data.tags["cnnpipe.stage"] == s] for s in RUNS}


def artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    """Every artifact path of a run, in sub-folders too."""
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def lock_md5s(repo: Path) -> dict[str, list[str]]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        name: [out["md5"] for out in stage.get("outs", [])]
        for name, stage in lock["stages"].items()
    }


def test_dvc_repro_runs_every_stage_and_logs_each_to_mlflow(digits_repo):
    repo_copy = digits_repo

    prepared = repo_copy / "data" / "prepared"
    sizes = {s: len(np.load(prepared / s / "labels.npy")) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 360
    assert np.load(prepared / "train" / "images.npy").shape[1:] == (16, 16, 3)
    augmented = np.load(repo_copy / "data" / "augmented" / "train" / "labels.npy")
    assert len(augmented) == sizes["train"]  # no offline copies: augmented on the fly
    for folder, architecture in (("scratch", "seed_cnn"), ("transfer", "efficientnet_lite0")):
        meta = json.loads((repo_copy / "models" / folder / "meta.json").read_text())
        assert meta["architecture"] == architecture and len(meta["classes"]) == 10
        assert (repo_copy / "models" / folder / "weights.pt").stat().st_size > 0
    metrics = json.loads((repo_copy / "reports" / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "macro_f1", "roc_auc", "ece", "audit_auc", "epsilon"}
    assert metrics["epsilon"] == {"scratch": None, "transfer": None}  # not private
    assert all(set(by_model) == {"scratch", "transfer"} for by_model in metrics.values())
    accuracy = metrics["accuracy"]
    assert accuracy["scratch"] > 0.5 and accuracy["transfer"] > 0.3
    history = (repo_copy / "reports" / "transfer" / "history.csv").read_text().splitlines()
    assert history[0] == (
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_balanced_accuracy"
    )
    assert len(history) == 3
    host = json.loads((repo_copy / "reports" / "train" / "host.json").read_text())
    assert host["torch"] == torch.__version__  # where the committed bytes come from
    assert host["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()

    runs = runs_by_stage(repo_copy)
    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    for stage in RUNS:
        assert len(runs[stage]) == 1, stage
        found = runs[stage][0]
        assert found.info.status == "FINISHED"
        assert found.data.params and found.data.metrics, stage
        # MLflow's system metrics stay off unless asked for (README, "Comparing runs"): at
        # step 0 they would join a logged model's metrics and lead its page
        assert not [name for name in found.data.metrics if name.startswith("system/")], stage
    for stage in STAGES:
        assert client.list_artifacts(runs[stage][0].info.run_id), stage
    train_run, transfer_run = runs["train"][0], runs["transfer"][0]
    assert train_run.info.run_name == "train-seed_cnn"
    assert train_run.data.tags["cnnpipe.upstream.prepare"] == runs["prepare"][0].info.run_id
    assert train_run.data.tags["cnnpipe.upstream.augment"] == runs["augment"][0].info.run_id
    assert train_run.data.metrics["test_accuracy"] == accuracy["scratch"]
    assert transfer_run.data.metrics["test_accuracy"] == accuracy["transfer"]
    for trained, name in ((train_run, "scratch"), (transfer_run, "transfer")):
        figures = sorted((repo_copy / "reports" / "figures").glob(f"{name}_*.png"))
        assert len(figures) >= 4  # learning curves, confusion, reliability, ROC/PR
        assert sorted(artifacts(client, trained.info.run_id, "test")) == [
            f"test/{figure.name}" for figure in figures
        ]
    assert runs["prepare"][0].data.metrics["images.test"] == 360
    shared = ("model", "epochs", "batch_size", "lr", "label_smoothing", "seed")
    assert all(name in transfer_run.data.params for name in shared)
    assert [train_run.data.params[n] for n in shared] == [
        "seed_cnn",
        "1",
        "32",
        "0.003",
        "0.1",
        "42",
    ]

    pipeline = runs["pipeline"][0]
    assert pipeline.info.run_name == "workspace"
    assert (
        pipeline.data.params["train.lr"] == "0.003"
        and "transfer.frozen_epochs" in pipeline.data.params
    )
    assert pipeline.data.metrics["accuracy.scratch"] == accuracy["scratch"]
    assert pipeline.data.metrics["accuracy.transfer"] == accuracy["transfer"]
    for stage in STAGES:
        assert pipeline.data.tags[f"cnnpipe.upstream.{stage}"] == runs[stage][0].info.run_id

    again = run([str(BIN / "dvc"), "repro"], repo_copy)  # record runs, and finds it is done
    assert again.stdout.count("didn't change, skipping") == len(STAGES)
    assert "recorded already" in again.stdout
    assert sum(len(r) for r in runs_by_stage(repo_copy).values()) == len(RUNS)

    samples = ["samples/digit-3.png", "samples/digit-7.png"]  # the README's predict example
    predicted = run([str(BIN / "cnnpipe"), "predict", *samples], repo_copy)
    assert predicted.stderr.splitlines()[-1] == "model: cnnpipe-classifier version 1 (@champion)"
    assert [line.split(": ")[0] for line in predicted.stdout.splitlines()] == samples
    store_uri = f"sqlite:///{repo_copy / 'mlflow.db'}"
    version = MlflowClient(store_uri).get_model_version("cnnpipe-classifier", "1")
    head = run(["git", "rev-parse", "HEAD"], repo_copy).stdout.strip()
    assert version.tags["dvc_exp_name"] == "workspace" and version.tags["git_commit"] == head
    data_hash = json.loads((repo_copy / "reports" / "prepare.json").read_text())["data_hash"]
    assert version.tags["data_hash"] == data_hash
    assert version.tags["gate"].startswith("version 1 of `cnnpipe-classifier` is the first")
    model_id = version.source.removeprefix("models:/")  # registered from the logged model
    champion = MlflowClient(store_uri).get_logged_model(model_id)  # its page's metrics
    on_its_page = {m.key: m.value for m in champion.metrics}
    chosen = json.loads((repo_copy / "reports" / "evaluate" / "chosen.json").read_text())
    assert on_its_page["test_accuracy"] == accuracy[chosen["model"]]


SECRET = "s3cr3t-value-that-must-not-be-logged"
DATA_PICTURES = ("samples.png", "preview.png", "misclassified", "gradcam")


def test_pipeline_runs_on_a_new_folder_and_reports_its_bad_files(
    repo_copy, image_folder, monkeypatch
):
    """A private data set: bad files reported, no data pictures logged, no secret logged."""
    (image_folder / "zero" / "corrupt.jpg").write_bytes(b"not a jpeg at all" * 10)
    (image_folder / "one" / "empty.png").write_bytes(b"")
    for name in ("CNNPIPE_API_TOKEN", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY", "SIGNING_KEY"):
        monkeypatch.setenv(name, SECRET)
    write_params(
        repo_copy,
        TINY | {"data.source": f"folder:{image_folder}", "tracking.log_images": False},
    )
    run([str(BIN / "dvc"), "repro"], repo_copy)

    report = json.loads((repo_copy / "reports" / "prepare.json").read_text())
    assert report["classes"] == ["one", "seven", "zero"]
    assert {Path(b["path"]).name: b["kind"] for b in report["bad_images"]} == {
        "corrupt.jpg": "unreadable",
        "empty.png": "empty_file",
    }
    per_class = (repo_copy / "reports" / "evaluate" / "per_class.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in per_class[1:]] == ["one", "seven", "zero"]
    runs = runs_by_stage(repo_copy)
    prepare_run = runs["prepare"][0]
    assert prepare_run.data.metrics["bad_images.unreadable"] == 1
    assert prepare_run.data.metrics["bad_images.empty_file"] == 1

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    logged = [path for stage in STAGES for path in artifacts(client, runs[stage][0].info.run_id)]
    assert any("confusion" in path for path in logged)  # aggregate plots still go
    assert not [path for path in logged if any(p in path for p in DATA_PICTURES)]
    report = (repo_copy / "reports" / "report.md").read_text()
    assert "confusion" in report and not any(p in report for p in DATA_PICTURES)
    assert not any(
        p in f.name for f in (repo_copy / "reports" / "figures").iterdir() for p in DATA_PICTURES
    )
    for stage in RUNS:
        data = runs[stage][0].data
        assert SECRET not in json.dumps([data.params, data.tags]), stage
    assert not pictures_of_data(repo_copy / "mlruns")


# The pictures evaluate draws of numbers only (learning curves, confusion matrices,
# reliability diagrams, ROC and precision-recall curves).
NUMBERS_ONLY = re.compile(r"(learning_curves|confusion|reliability|roc_pr)\.png$")
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


def pictures_of_data(store: Path) -> list[str]:
    """Every file anywhere in an MLflow artifact store that holds or embeds an image, other
    than pictures of numbers: artifacts, logged models and their input examples."""
    found = []
    for path in store.rglob("*"):
        if not path.is_file() or NUMBERS_ONLY.search(path.name):
            continue
        content = path.read_bytes()
        if path.suffix == ".html":  # the report, its figures inlined: by their names
            inlined = re.findall(r'<img src="data:[^"]*" alt="([^"]*)"', content.decode())
            found += [name for name in inlined if not NUMBERS_ONLY.search(name)]
            continue
        embedded = b"iVBORw0KGgo" in content or b"/9j/" in content  # PNG or JPEG in base64
        if content.startswith(IMAGE_MAGIC) or "input_example" in path.name or embedded:
            found.append(str(path.relative_to(store)))
    return found


def test_data_pictures_are_logged_by_default(digits_repo):
    runs = runs_by_stage(digits_repo)
    client = MlflowClient(f"sqlite:///{digits_repo / 'mlflow.db'}")
    logged = {stage: artifacts(client, runs[stage][0].info.run_id) for stage in STAGES}
    assert "samples.png" in logged["prepare"] and "preview.png" in logged["augment"]
    assert "figures/scratch_gradcam.png" in logged["evaluate"]
    assert "test/scratch_gradcam.png" in logged["train"]
    assert {"report.md", "figures/scratch_confusion.png"} <= set(logged["evaluate"])


def test_a_failing_prepare_says_why_in_one_line_and_keeps_the_old_output(
    repo_copy, image_folder, tmp_path
):
    write_params(repo_copy, {"data.source": f"folder:{image_folder}", "data.image_size": 16})
    run([str(BIN / "cnnpipe"), "prepare"], repo_copy)
    before = store.fingerprint(repo_copy / "data" / "prepared")

    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    write_params(repo_copy, {"data.source": f"folder:{empty}", "data.image_size": 16})
    failed = run([str(BIN / "cnnpipe"), "prepare"], repo_copy, expect=2)
    assert "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"cnnpipe prepare: error: data folder {empty} holds no images: "
        "put them in one sub-folder per class"
    ]
    assert store.fingerprint(repo_copy / "data" / "prepared") == before
