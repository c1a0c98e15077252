"""Every MLflow call in cnnpipe lives here.

One experiment; one run per stage execution, named after the stage (and model). Each run is
tagged with a fingerprint of what the stage wrote, so a later stage finds the run that produced
its inputs by hashing them: no run id has to be stored in an output, and outputs stay
byte-identical between reproducible runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

STAGE_TAG = "cnnpipe.stage"
FINGERPRINT_TAG = "cnnpipe.fingerprint"
UPSTREAM_TAG = "cnnpipe.upstream.{stage}"
PYFUNC_REQUIREMENTS = [
    f"{name}=={version(name)}"
    for name in ("torch", "torchvision", "timm", "pillow", "pandas", "numpy", "mlflow")
]


def repo_root(start: Path | None = None) -> Path:
    """The DVC repository the stage runs in. `dvc exp run --queue/--temp` runs stages in a copy
    under `<repo>/.dvc/tmp/exps/`; that copy's runs belong to the outer repository's store."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else an SQLite file at the repository root (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


class StageRun:
    """The active MLflow run of one stage execution."""

    def __init__(self, run: mlflow.ActiveRun):
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One batched request for all `metrics` (SQLite costs ~9 ms per call)."""
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, payload: object, artifact_file: str) -> None:
        mlflow.log_dict(payload, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def set_fingerprint(self, fingerprint: str) -> None:
        mlflow.set_tag(FINGERPRINT_TAG, fingerprint)

    def log_classifier(self, model_dir: Path, example_images: np.ndarray) -> None:
        """Log the model folder as the `ImageClassifier` pyfunc, with a signature."""
        from cnnpipe.serving import ImageClassifier

        classifier = ImageClassifier()
        classifier.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
        example_output = classifier.predict(None, example_images)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=classifier,
            artifacts={"model_dir": str(model_dir)},
            signature=infer_signature(example_images, example_output),
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=PYFUNC_REQUIREMENTS,
        )


class _OtherRank:
    """Stands in for the run on DDP ranks other than 0: only rank 0 logs."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: dict[str, object],
    model: str | None = None,
    upstream: dict[str, str | None] | None = None,
) -> Iterator[StageRun]:
    """Start the MLflow run of a stage; a failing stage leaves its run marked FAILED."""
    if os.environ.get("RANK", "0") != "0":
        yield _OtherRank()
        return
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    tags = {STAGE_TAG: stage, "git_commit": _git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if model:
        tags["model"] = model
    for upstream_stage, run_id in (upstream or {}).items():
        tags[UPSTREAM_TAG.format(stage=upstream_stage)] = run_id or "not found"
    run_name = f"{stage}-{model}" if model else stage
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        mlflow.log_params(params)
        yield StageRun(run)


def find_run(experiment: str, stage: str, fingerprint: str) -> str | None:
    """The newest finished run of `stage` that wrote outputs with this fingerprint."""
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = MlflowClient().search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"
            " and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def log_to_run(
    run_id: str, metrics: dict[str, float], figures: dict[str, Figure] | None = None
) -> None:
    """Add evaluation results to an earlier (finished) run, e.g. test metrics to a train run."""
    client = MlflowClient(tracking_uri())
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for artifact_file, figure in (figures or {}).items():
        client.log_figure(run_id, figure, artifact_file)
