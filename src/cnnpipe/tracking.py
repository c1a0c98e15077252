"""Every MLflow call in cnnpipe lives here.

One experiment; one run per stage execution, named after the stage (and model). Each run is
tagged with a fingerprint of what the stage wrote, so a later stage finds the run that produced
its inputs by hashing them: no run id has to be stored in an output, and outputs stay
byte-identical between reproducible runs.

The store is an SQLite file or a tracking server. A server that does not answer when a stage
starts stops the stage with one line; a server lost while a stage runs does not stop it: what
could not be sent is named in a warning, and the stage's own metrics and plots files hold it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
from filelock import FileLock
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema

from cnnpipe.errors import UserError

CHAMPION = "champion"
STAGE_TAG = "cnnpipe.stage"
FINGERPRINT_TAG = "cnnpipe.fingerprint"
UPSTREAM_TAG = "cnnpipe.upstream.{stage}"
PYFUNC_REQUIREMENTS = [
    f"{name}=={version(name)}"
    for name in ("torch", "torchvision", "timm", "pillow", "pandas", "numpy", "mlflow")
]
HEALTH_TIMEOUT_S = 5
# MLflow's HTTP client retries a failed request 7 times with doubling waits (minutes in all);
# a stage that lost its server should notice within seconds. Users can still set these.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


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


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_unreachable(uri: str) -> str | None:
    """Why the tracking server at `uri` does not answer, or None when it answers at all (an
    HTTP error such as 401 still means the server is there; MLflow reports it properly)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts. A server decides for itself. With SQLite,
    MLflow's default is `./mlruns` under the working directory, which inside `dvc exp run`
    is a temporary copy of the repository that DVC deletes: so always the repository's."""
    return None if is_server(uri) else (repo_root() / "mlruns" / experiment).as_uri()


@contextlib.contextmanager
def _one_process_at_a_time(uri: str) -> Iterator[None]:
    """Stages running in parallel (`dvc queue start -j 2`) on one new SQLite file race to create
    its tables and the experiment ("duplicate column name"); a lock file next to it orders them.
    Later writes are safe: MLflow sets SQLite's busy timeout (20 s) on every session."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///").split("?")[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        yield


@contextlib.contextmanager
def champion_gate() -> Iterator[None]:
    """Held while evaluate registers a model and decides who holds the champion alias.

    Experiments that finish together (`dvc queue start -j 2`) would otherwise both find no
    champion and both create the alias (a unique-constraint error in the registry), or both
    compare against the same old champion. This orders the evaluates of one repository (queue
    copies included); machines that share only a tracking server are not ordered by it.
    """
    root = repo_root()
    folder = root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else root
    folder.mkdir(exist_ok=True)
    with FileLock(str(folder / "cnnpipe-champion.lock")):
        yield


def check_server() -> str:
    """The tracking URI, after checking that a tracking server there answers (a UserError in
    one line if not), with MLflow's HTTP retries cut from minutes to seconds."""
    uri = tracking_uri()
    if is_server(uri):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
        reason = server_unreachable(uri)
        if reason:
            raise UserError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it, "
                "or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
            )
    return uri


def lost_server_error() -> UserError | None:
    """For a stage that failed: the one-line error to show instead of the traceback when its
    tracking server has stopped answering since `check_server` found it (None otherwise)."""
    uri = tracking_uri()
    reason = server_unreachable(uri) if is_server(uri) else None
    if reason is None:
        return None
    return UserError(
        f"MLflow tracking server {uri} was lost ({reason}): start it again, then rerun "
        "the stage (dvc repro)"
    )


def _client(experiment: str | None = None) -> MlflowClient:
    """A client of the store, with `experiment` created if missing."""
    uri = check_server()
    mlflow.set_tracking_uri(uri)
    with _one_process_at_a_time(uri):
        client = MlflowClient(uri)  # with SQLite, this creates the tables
        if experiment and client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, _artifact_location(uri, experiment))
    return client


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
    show data (`log_data_figure`) are not logged; aggregate pictures (`log_figure`) are.

    Every call, starting the run included, goes through `_send`: once the tracking server is
    lost, nothing more is sent (no waiting on retries each epoch); what was not sent is listed
    in warnings instead."""

    def __init__(self, uri: str, log_images: bool):
        self.run_id: str | None = None  # None until the server has answered `start`
        self.uri = uri
        self.log_images = log_images
        self.not_sent: list[str] = []

    def start(
        self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, object]
    ) -> None:
        def start_run() -> None:
            mlflow.set_experiment(experiment)
            self.run_id = mlflow.start_run(run_name=run_name, tags=tags).info.run_id

        self._send("the run itself", start_run)
        self._send("params", lambda: mlflow.log_params(params))

    def _send(self, what: str, call: Callable[[], object], even_if_lost: bool = False) -> None:
        if self.not_sent and not even_if_lost:
            self.not_sent.append(what)
            return
        try:
            call()
        except (MlflowException, OSError):
            if not is_server(self.uri) or server_unreachable(self.uri) is None:
                raise
            if not self.not_sent:
                print(
                    f"warning: MLflow server {self.uri} unreachable; not sent: {what}. "
                    "The stage goes on; its metrics and plots files keep the results.",
                    file=sys.stderr,
                )
            self.not_sent.append(what)

    def end(self, status: str) -> None:
        """End the run (one last try to record `status`, the server may be back) and list
        what the server did not get."""
        if self.run_id is not None:
            self._send(f"run status {status}", lambda: mlflow.end_run(status), even_if_lost=True)
        if self.not_sent:
            print(
                f"warning: MLflow server {self.uri} was lost; run {self.run_id or '(none)'} lacks: "
                + "; ".join(self.not_sent),
                file=sys.stderr,
            )

    def server_lost(self) -> bool:
        return bool(self.not_sent)

    def log_to_earlier_run(
        self, run_id: str, metrics: dict[str, float], figures: dict[str, Figure]
    ) -> None:
        """Add results to an earlier (finished) run, e.g. test metrics to the train run."""

        def send() -> None:
            client = MlflowClient()
            now = int(time.time() * 1000)
            metric_list = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
            client.log_batch(run_id, metrics=metric_list)
            for artifact_file, figure in figures.items():
                client.log_figure(run_id, figure, artifact_file)

        self._send(f"test results for run {run_id}", send)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One batched request for all `metrics` (SQLite costs ~9 ms per call); `step` is the
        epoch."""
        what = f"epoch {step} metrics" if step is not None else "metrics"
        values = {k: float(v) for k, v in metrics.items()}
        self._send(f"{what} ({', '.join(values)})", lambda: mlflow.log_metrics(values, step=step))

    def log_dict(self, payload: object, artifact_file: str) -> None:
        self._send(artifact_file, lambda: mlflow.log_dict(payload, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send(artifact_file, lambda: mlflow.log_text(text, artifact_file))

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        self._send(artifact_file, lambda: mlflow.log_figure(figure, artifact_file))

    def log_data_figure(self, figure: Figure, artifact_file: str) -> None:
        if self.log_images:
            self.log_figure(figure, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send(path.name, lambda: mlflow.log_artifact(str(path), artifact_path))

    def set_fingerprint(self, fingerprint: str) -> None:
        self._send("fingerprint tag", lambda: mlflow.set_tag(FINGERPRINT_TAG, fingerprint))

    def log_classifier(self, model_dir: Path, example_images: np.ndarray) -> None:
        """Log the model folder as the `ImageClassifier` pyfunc. Its signature takes a column
        `image` of encoded image files (bytes; base64 text over HTTP) or H x W x 3 arrays."""
        from cnnpipe.serving import ImageClassifier, encoded

        classifier = ImageClassifier()
        classifier.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
        example_input = encoded(example_images)
        example_output = classifier.predict(None, example_input)
        self._send(
            "model",
            lambda: mlflow.pyfunc.log_model(
                name="model",
                python_model=classifier,
                artifacts={"model_dir": str(model_dir)},
                signature=ModelSignature(
                    Schema([ColSpec(AnyType(), "image")]),  # encoded file or pixel array
                    infer_signature(example_input, example_output).outputs,
                ),
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=PYFUNC_REQUIREMENTS,
            ),
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
    _client(experiment)
    tags = {STAGE_TAG: stage, "git_commit": _git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if model:
        tags["model"] = model
    for upstream_stage, run_id in (upstream or {}).items():
        tags[UPSTREAM_TAG.format(stage=upstream_stage)] = run_id or "not found"
    run_name = f"{stage}-{model}" if model else stage
    run = StageRun(tracking_uri(), log_images)
    run.start(experiment, run_name, tags, params)
    status = "FINISHED"
    try:
        yield run
    except BaseException:
        status = "FAILED"
        raise
    finally:
        run.end(status)


def find_run(experiment: str, stage: str, fingerprint: str) -> str | None:
    """The newest finished run of `stage` that wrote outputs with this fingerprint."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'"
            " and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def champion(registered_model: str) -> ModelVersion | None:
    """The version that holds the `champion` alias, if any."""
    client = _client()
    try:
        return client.get_model_version_by_alias(registered_model, CHAMPION)
    except MlflowException:
        return None


def register(run_id: str, registered_model: str, tags: dict[str, str]) -> ModelVersion:
    """Register the model logged by `run_id` (once: a run already registered keeps its
    version) and tag the version, e.g. with the test data hash and its test metrics."""
    client = _client()
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
    _client().set_registered_model_alias(registered_model, CHAMPION, version)


def load_classifier(model_uri: str):
    """The `ImageClassifier` behind a logged or registered model (e.g. `models:/name@champion`)."""
    _client()
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


def load_champion(registered_model: str):
    """The champion's `ImageClassifier`, or a clear error when there is none yet."""
    if champion(registered_model) is None:
        raise UserError(
            f"no champion of '{registered_model}' in {tracking_uri()}: run the pipeline "
            "(dvc repro) first, or pass --model models/scratch"
        )
    return load_classifier(f"models:/{registered_model}@{CHAMPION}")
