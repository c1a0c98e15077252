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
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from cnnpipe.errors import UserError

CHAMPION = "champion"
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
    """The active MLflow run of one stage execution. With `log_images` off, pictures that
    show data (`log_data_figure`) are not logged; aggregate pictures (`log_figure`) are."""

    def __init__(self, run: mlflow.ActiveRun, log_images: bool):
        self.run_id = run.info.run_id
        self.log_images = log_images

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One batched request for all `metrics` (SQLite costs ~9 ms per call)."""
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, payload: object, artifact_file: str) -> None:
        mlflow.log_dict(payload, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)

    def log_data_figure(self, figure: Figure, artifact_file: str) -> None:
        if self.log_images:
            mlflow.log_figure(figure, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def set_fingerprint(self, fingerprint: str) -> None:
        mlflow.set_tag(FINGERPRINT_TAG, fingerprint)

    def log_classifier(self, model_dir: Path, example_images: np.ndarray) -> None:
        """Log the model folder as the `ImageClassifier` pyfunc. Its signature takes a column
        `image` of encoded image files (bytes; base64 text over HTTP)."""
        from cnnpipe.serving import ImageClassifier, encoded

        classifier = ImageClassifier()
        classifier.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
        example_input = encoded(example_images)
        example_output = classifier.predict(None, example_input)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=classifier,
            artifacts={"model_dir": str(model_dir)},
            signature=infer_signature(example_input, example_output),
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
    log_images: bool = True,
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
        yield StageRun(run, log_images)


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


def champion(registered_model: str) -> ModelVersion | None:
    """The version that holds the `champion` alias, if any."""
    client = MlflowClient(tracking_uri())
    try:
        return client.get_model_version_by_alias(registered_model, CHAMPION)
    except MlflowException:
        return None


def register(run_id: str, registered_model: str, tags: dict[str, str]) -> ModelVersion:
    """Register the model logged by `run_id` (once: a run already registered keeps its
    version) and tag the version, e.g. with the test data hash and its test metrics."""
    client = MlflowClient(tracking_uri())
    existing = [
        v
        for v in client.search_model_versions(f"name = '{registered_model}'")
        if v.run_id == run_id
    ]
    if existing:
        version = existing[0]
    else:
        version = mlflow.register_model(f"runs:/{run_id}/model", registered_model)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version.version, key, value)
    return client.get_model_version(registered_model, version.version)


def make_champion(registered_model: str, version: str) -> None:
    MlflowClient(tracking_uri()).set_registered_model_alias(registered_model, CHAMPION, version)


def load_classifier(model_uri: str):
    """The `ImageClassifier` behind a logged or registered model (e.g. `models:/name@champion`)."""
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


def load_champion(registered_model: str):
    """The champion's `ImageClassifier`, or a clear error when there is none yet."""
    if champion(registered_model) is None:
        raise UserError(
            f"no champion of '{registered_model}' in {tracking_uri()}: run the pipeline "
            "(dvc repro) first, or pass --model models/scratch"
        )
    return load_classifier(f"models:/{registered_model}@{CHAMPION}")
