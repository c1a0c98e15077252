"""MLflow runs: every tracking call of the stages lives here (the registry's in registry.py).

One experiment (marked as model development, so MLflow's UI opens on its training runs); one
run per stage execution, named after the stage (and model); one pipeline run per `dvc repro`
or `dvc exp run`, named after the experiment, that holds every param and both test results.
Each stage run is tagged with a fingerprint of what the stage wrote, so a later stage finds
the run that produced its inputs by hashing them: no run id has to be stored in an output, and
outputs stay byte-identical between reproducible runs.

The store is an SQLite file or a tracking server. A server that does not answer when a stage
starts stops the stage with one line; a server lost while a stage runs does not stop it: what
could not be sent is named in a warning, and the stage's own metrics and plots files hold it.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Run, RunStatus
from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe import layout, store
from cnnpipe.errors import UserError, first_line

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

    from cnnpipe.params import Params

STAGE_TAG = "cnnpipe.stage"
FINGERPRINT_TAG = "cnnpipe.fingerprint"
UPSTREAM_TAG = "cnnpipe.upstream.{stage}"
PROCESS_TAG = "cnnpipe.process"  # host:pid of the stage, to tell a killed run from a live one
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXPERIMENT_NOTE = (
    "cnnpipe's image classifiers. Each `dvc repro` or `dvc exp run` adds one **pipeline** run "
    "named after the DVC experiment (or `workspace`) with every param and both models' test "
    "scores, and one run per stage that ran: `prepare`, `augment`, `train-<model>` (the "
    "scratch model), `transfer-<model>` (the transfer model), `evaluate`. Select a `train-…` "
    "and a `transfer-…` run and press Compare: their params and test metrics share names."
)
HEALTH_TIMEOUT_S = 5
API_PROBE = "api/2.0/mlflow/experiments/search?max_results=1"  # GET, answers JSON
API_READ_LIMIT = 1 << 16  # bytes of the probe's answer read
STORE_SCHEMES = ("http", "https", "databricks")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy, with drivers: +psycopg
# MLflow's HTTP client retries a failed request 7 times with doubling waits (minutes in all);
# a stage that lost its server should notice within seconds. Users can still set these.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
SYSTEM_METRICS_INTERVAL_S = 5
DATABASE_TIMEOUT_S = 5  # to connect to a database store


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
    """Why the tracking server at `uri` does not answer as MLflow's API does, or None when it
    does. The check is one API call (`API_PROBE`) with a deadline, not the health page: a
    proxy's login page answers 200 with HTML, and a server can answer its health page while
    its API calls stall. An HTTP error such as 401 means the server is there (MLflow reports
    it properly), unless its body is no JSON either."""
    probe = f"{uri.rstrip('/')}/{API_PROBE}"
    try:
        with urllib.request.urlopen(probe, timeout=HEALTH_TIMEOUT_S) as answer:
            return _not_mlflow(answer.headers.get_content_type(), answer.read(API_READ_LIMIT))
    except urllib.error.HTTPError as err:
        return _not_mlflow(err.headers.get_content_type(), err.read(API_READ_LIMIT))
    except TimeoutError:
        return f"no answer to an API call within {HEALTH_TIMEOUT_S} s"
    except (OSError, ValueError, http.client.HTTPException) as err:
        return str(getattr(err, "reason", err))


def _not_mlflow(content_type: str, body: bytes) -> str | None:
    """What the server answered instead of MLflow's JSON, or None if it was JSON."""
    try:
        json.loads(body)
        return None
    except ValueError:
        start = " ".join(body[:60].decode("utf-8", "replace").split())
        return f"it answered {content_type} instead of MLflow's JSON, starting {start!r}"


def check_server() -> str:
    """The tracking URI, after checking that it is a store MLflow can use (one-line UserError
    if not): a tracking server that answers MLflow's API (see `server_unreachable`), with
    MLflow's HTTP retries cut from minutes to seconds, or a database."""
    uri = tracking_uri()
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme not in STORE_SCHEMES and not scheme.startswith(DATABASE_SCHEMES):
        raise UserError(
            f"MLFLOW_TRACKING_URI {uri} is not a store cnnpipe can use: give an http(s):// "
            "tracking server or a database (sqlite:///, postgresql://, mysql://), or unset it"
            " to use the local mlflow.db"
        )
    if is_server(uri):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
        reason = server_unreachable(uri)
        if reason:
            raise UserError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it, "
                "or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
            )
    elif reason := database_unreachable(uri):
        raise UserError(
            f"the MLflow store {uri} cannot be opened ({reason}): start or fix the database, "
            "or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        )
    return uri


def database_unreachable(uri: str) -> str | None:
    """Why the database store at `uri` cannot be opened, found in one try within
    `DATABASE_TIMEOUT_S` (MLflow would try ten times over about 100 s, warning each time), or
    None. An SQLite file is only checked to be a file where it exists: MLflow creates it."""
    import sqlalchemy

    if uri.startswith("sqlite:"):
        path = sqlite_file(uri)
        return f"{path} is not a file" if path.exists() and not path.is_file() else None
    dialect = uri.partition(":")[0].partition("+")[0]
    timeout = {"connect_timeout": DATABASE_TIMEOUT_S} if dialect in ("postgresql", "mysql") else {}
    try:  # the driver's errors (a missing driver included) and SQLAlchemy's: one line
        engine = sqlalchemy.create_engine(uri, connect_args=timeout)
    except Exception as err:
        return first_line(err)
    try:
        with engine.connect():
            return None
    except Exception as err:
        return first_line(err)
    finally:
        engine.dispose()


def sqlite_file(uri: str) -> Path:
    """The database file of an SQLite store's URI (`sqlite:////abs/path.db?options`)."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0])


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


def quoted(value: str) -> str:
    """`value` as a string literal of an MLflow search filter (names are data, not syntax)."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise UserError(f"{value!r} holds both kinds of quotes: MLflow cannot search for it")


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
    database = sqlite_file(uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        yield


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (creating tables, detecting uv, copying files) and progress bars
    say nothing a stage's user needs; its warnings still show."""
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # a lost server is reported once, by StageRun; the sampling thread would warn again
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)


def client(experiment: str | None = None) -> MlflowClient:
    """A client of the store, with `experiment` created (and described) if missing."""
    uri = check_server()
    _quiet_mlflow()
    mlflow.set_tracking_uri(uri)
    with _one_process_at_a_time(uri):
        try:
            store = MlflowClient(uri)  # with SQLite, this creates the tables
            if experiment and store.get_experiment_by_name(experiment) is None:
                store.create_experiment(
                    experiment,
                    _artifact_location(uri, experiment),
                    tags=EXPERIMENT_KIND | {"mlflow.note.content": EXPERIMENT_NOTE},
                )
        except (MlflowException, SQLAlchemyError, OSError) as err:
            if is_server(uri):  # a server's failures are told by the stage runner
                raise
            raise UserError(
                f"the MLflow store {uri} cannot be used ({first_line(err)}): "
                "move it aside to start a new one, or set MLFLOW_TRACKING_URI to another"
            ) from None
    return store


def artifact_address(run_id: str, path: str) -> str:
    """The address of a run's artifact as the MLflow UI serves it, with a scheme and no host
    (`http:/get-artifact?...`): the browser resolves it against the UI's own host and port,
    whichever `cnnpipe ui --port` chose, and MLflow 3.17's Markdown viewer, which shows only
    images whose address starts with http(s), shows it (a relative address stays text)."""
    uri = tracking_uri()
    server = urllib.parse.urlsplit(uri if is_server(uri) else "http://localhost")
    query = urllib.parse.urlencode({"run_uuid": run_id, "path": path})
    return f"{server.scheme}:{server.path.rstrip('/')}/get-artifact?{query}"


def run_link(experiment_id: str, run_id: str | None = None) -> str:
    """The UI's page of a run (or of the experiment's runs), opened in its Model training view
    (MLflow 3.17 opens experiments in its GenAI view otherwise)."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{page}?workflowType=machine_learning"


def _html_with_pictures(markdown: str, folder: Path) -> str:
    """The Markdown report as one HTML page, its pictures inlined as data URIs."""
    from markdown_it import MarkdownIt

    def inline(match: re.Match) -> str:
        picture = base64.b64encode((folder / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{picture}"'

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)  # no raw HTML
    body = re.sub(r'src="(figures/[^"]+\.png)"', inline, body)
    return (
        '<!doctype html><html><head><meta charset="utf-8"><style>'
        "body{font-family:sans-serif} table{border-collapse:collapse}"
        " th,td{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}</style></head>"
        f"<body>{body}</body></html>"
    )


def git_tags() -> dict[str, str]:
    """MLflow's standard source tags for the commit the stage runs from: inside `dvc exp run`
    that is the experiment's baseline commit, with the params DVC set on top (dirty)."""

    def git(*args: str) -> str:
        found = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return found.stdout.strip() if found.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "mlflow.source.git.commit": commit,
        "mlflow.source.git.dirty": str(dirty).lower(),
        "mlflow.source.git.branch": git("rev-parse", "--abbrev-ref", "HEAD"),
    }


def execution_name() -> str:
    """The DVC experiment this process runs in (`dvc exp run`), or `workspace` (`dvc repro`)."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def execution_tags() -> dict[str, str]:
    """The tags that tie a run to the code and the DVC experiment it ran in."""
    tags = git_tags() | {
        "mlflow.source.name": "cnnpipe",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
    }
    tags["dvc_exp_name"] = execution_name()
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


class StageRun:
    """The active MLflow run of one stage execution: the `recorder.Recorder` a stage gets.
    With `log_images` off, nothing that shows data is logged (samples, previews, the model's
    input example); pictures of numbers (`log_figure`) are.

    Every call, starting the run included, goes through `_send`: once the tracking server is
    lost, nothing more is sent (no waiting on retries each epoch); what was not sent is listed
    in warnings instead."""

    def __init__(self, uri: str, log_images: bool, upstream: dict[str, str | None] | None = None):
        self.run_id: str | None = None  # None until the server has answered `start`
        self.uri = uri
        self.log_images = log_images
        self.upstream = upstream or {}  # stage -> the run that made this stage's inputs
        self.not_sent: list[str] = []

    def start(
        self,
        experiment: str,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, object],
        system_metrics: bool = False,
    ) -> None:
        def start_run() -> None:
            # Created by the client, then made active: the fluent start_run would also resolve
            # MLflow's own source tags (importing GitPython, ~0.3 s), which `tags` already hold.
            store = MlflowClient()
            experiment_id = store.get_experiment_by_name(experiment).experiment_id
            created = store.create_run(experiment_id, tags=tags, run_name=run_name)
            run = mlflow.start_run(created.info.run_id, log_system_metrics=system_metrics)
            self.run_id = run.info.run_id

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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One batched request for all `metrics` (SQLite costs ~9 ms per call); `step` is the
        epoch."""
        what = f"epoch {step} metrics" if step is not None else "metrics"
        values = {k: float(v) for k, v in metrics.items()}
        self._send(f"{what} ({', '.join(values)})", lambda: mlflow.log_metrics(values, step=step))

    def log_epoch(self, record: dict[str, float], images_per_second: float) -> None:
        """One epoch's losses and accuracies (the `epoch` entry is the step)."""
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        self.log_metrics(metrics | {"images_per_second": images_per_second}, step=record["epoch"])

    def log_dict(self, payload: object, artifact_file: str) -> None:
        self._send(artifact_file, lambda: mlflow.log_dict(payload, artifact_file))

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """Rows of one dict each, shown as a table in the run's artifacts (and evaluation view)."""
        columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        self._send(artifact_file, lambda: mlflow.log_table(columns, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send(artifact_file, lambda: mlflow.log_text(text, artifact_file))

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """A picture of numbers only (curves, tables): logged whatever `log_images` says."""
        from cnnpipe import plots

        self._send(artifact_file, lambda: mlflow.log_figure(figure, artifact_file))
        plots.close(figure)

    def _log_data_figure(self, draw: Callable[[], Figure], artifact_file: str) -> None:
        """A picture that shows data: drawn and logged only with `log_images`."""
        if self.log_images:
            self.log_figure(draw(), artifact_file)

    def log_samples(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        from cnnpipe import plots

        self._log_data_figure(
            lambda: plots.samples_per_class(images, labels, classes), "samples.png"
        )

    def log_augmentation_preview(self, originals: np.ndarray, augmented: np.ndarray) -> None:
        from cnnpipe import plots

        self._log_data_figure(lambda: plots.before_after(originals, augmented), "preview.png")

    def log_learning_curves(self, history: list[dict], title: str) -> None:
        from cnnpipe import plots

        self.log_figure(plots.learning_curves(history, title), "learning_curves.png")

    def log_model(self, target: layout.TrainedModel, examples: np.ndarray) -> None:
        """The model folder as an MLflow model (serving.py), with `examples` as its input
        example only when `log_images` allows pictures of data."""
        from cnnpipe import serving

        shown = examples if self.log_images else None
        self._send("model", lambda: serving.log_model(target, shown))

    def log_report(self, report: Path, figures: Path) -> None:
        """The report with its pictures, as MLflow's UI can show them: `figures/` beside
        `report.md`, whose `figures/...` links point at the UI's own artifact address
        (`artifact_address`: any host, any port), and
        `report.html`, the same report with the pictures inlined, which shows them wherever
        the UI runs."""

        def send() -> None:
            text = report.read_text()
            linked = re.sub(
                r"\]\((figures/[^)]+)\)",
                lambda link: f"]({artifact_address(self.run_id, link[1])})",
                text,
            )
            mlflow.log_text(linked, report.name)
            mlflow.log_text(
                _html_with_pictures(text, report.parent), report.with_suffix(".html").name
            )
            mlflow.log_artifacts(str(figures), figures.name)

        self._send(report.name, send)

    def set_fingerprint(self, fingerprint: str) -> None:
        self._send("fingerprint tag", lambda: mlflow.set_tag(FINGERPRINT_TAG, fingerprint))

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._send("tags", lambda: mlflow.set_tags(tags))

    def describe(self, text: str) -> None:
        """The run's description in the MLflow UI (Markdown)."""
        self._send("description", lambda: mlflow.set_tag("mlflow.note.content", text))

    def log_splits(
        self, splits: dict[str, object], classes: list[str], data_hash: str, source: str
    ) -> None:
        """Record the splits a stage read as MLflow datasets, so the runs table's Dataset
        column tells runs on other data apart: `source` (`data.source`) names them, the
        prepared data's hash is the digest; `splits` maps a context (train, val, test) to a
        `store.Split`."""

        def send() -> None:
            from mlflow.data import from_numpy
            from mlflow.data.dataset_source_registry import get_registered_sources

            # MLflow registers its local-file source twice and warns that a path is ambiguous
            local = next(
                kind for kind in get_registered_sources() if kind.__name__.startswith("Local")
            )
            prepared = local(layout.PREPARED.resolve().as_uri())
            datasets = [
                from_numpy(
                    split.images,
                    source=prepared,
                    targets=split.labels,
                    name=source,
                    digest=data_hash[:12],
                )
                for split in splits.values()
            ]
            tags = [{"classes": ", ".join(classes)[:250]} for _ in splits]
            # MLflow gets or creates a dataset in two steps: parallel stages logging the same
            # one (trials of `cnnpipe tune`) would both create it ("UNIQUE constraint failed")
            with _one_process_at_a_time(self.uri):
                mlflow.log_inputs(datasets, contexts=list(splits), tags_list=tags)

        self._send("datasets", send)

    def log_test_results(self, stage: str, metrics: dict[str, float], figures: list[Path]) -> None:
        """Add evaluate's test results (metrics, and the figure files under `test/`) to the run
        of upstream `stage` that trained the model, and the metrics to the model it logged (its
        page in the UI shows them), the first time that model is evaluated. Later evaluations
        record their own values in their own runs: a run's results, once measured, stay as
        they were."""
        run_id = self.upstream.get(stage)
        if run_id is None:
            return

        def send() -> None:
            store = MlflowClient()
            run = store.get_run(run_id)
            if "test_accuracy" in run.data.metrics:
                return
            now, model_id = int(time.time() * 1000), _last_model_id(run)
            store.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0, model_id) for k, v in metrics.items()],
            )
            for figure in figures:
                store.log_artifact(run_id, str(figure), "test")

        self._send(f"test results for run {run_id}", send)


class _OtherRank:
    """Stands in for the run on DDP ranks other than 0: only rank 0 logs."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def close_abandoned_runs(store: MlflowClient, experiment: str, stage: str) -> None:
    """Mark runs of `stage` that a killed process left RUNNING on this machine as KILLED (a run
    whose process is still alive, e.g. a parallel experiment, is left alone)."""
    found = store.get_experiment_by_name(experiment)
    if found is None:
        return
    running = store.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = {quoted(stage)} and attributes.status = 'RUNNING'",
    )
    host = socket.gethostname()
    for stale in running:
        owner, _, pid = stale.data.tags.get(PROCESS_TAG, "").rpartition(":")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            store.set_terminated(stale.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            print(
                f"marked run {stale.info.run_id} of an earlier, killed {stage} as KILLED",
                file=sys.stderr,
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: dict[str, object],
    *,
    model: str | None = None,
    upstream: dict[str, str | None] | None = None,
    log_images: bool = True,
    run_name: str | None = None,
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """Start the MLflow run of a stage, named `<stage>-<model>` (or `run_name`), tagged with
    the runs that made its inputs (`upstream`), with CPU, memory (and GPU) use sampled every
    few seconds when `system_metrics`; a failing stage leaves its run marked FAILED (KILLED
    when stopped by Ctrl-C). The options after `params` are keyword-only, each with a
    default, as `mlflow.start_run`'s."""
    if os.environ.get("RANK", "0") != "0":
        yield _OtherRank()
        return
    store = client(experiment)
    close_abandoned_runs(store, experiment, stage)
    tags = execution_tags() | {STAGE_TAG: stage, PROCESS_TAG: _this_process()}
    if model:
        tags["model"] = model
    for upstream_stage, run_id in (upstream or {}).items():
        tags[UPSTREAM_TAG.format(stage=upstream_stage)] = run_id or "not found"
    run = StageRun(tracking_uri(), log_images, upstream)
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        mlflow.set_system_metrics_samples_before_logging(1)
    name = run_name or (f"{stage}-{model}" if model else stage)
    run.start(experiment, name, tags, params, system_metrics)
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:  # Ctrl-C: stopped, as a killed process's run is marked
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        # Stopped mid-write, the store may still be locked: then the run stays RUNNING until
        # the stage's next run marks it KILLED (`close_abandoned_runs`), and Ctrl-C goes on.
        with contextlib.suppress(Exception) if status == "KILLED" else contextlib.nullcontext():
            run.end(status)


@contextlib.contextmanager
def recording(stage: layout.Stage, params: Params) -> Iterator[StageRun]:
    """The MLflow run of one execution of `stage`, as the stage table describes it: named
    after the stage (and its model), with the params it reads, tagged with the runs that made
    its inputs; once the stage has finished, tagged with the fingerprint of its outputs, by
    which the stages after it find it."""
    if os.environ.get("RANK", "0") != "0":
        yield _OtherRank()
        return
    experiment = params.tracking.experiment
    inputs = {s.name: store.fingerprint(*s.identity) for s in layout.upstream(stage)}
    with stage_run(
        stage.name,
        experiment,
        layout.stage_params(stage.name, params),
        model=layout.param_value(params, stage.model_param) if stage.model_param else None,
        upstream=find_runs(experiment, inputs),
        log_images=params.tracking.log_images,
        # Off unless asked for: sampled at step 0, they would join the logged model's
        # metrics (MLflow links a run's step-0 metrics to the model) and lead its page.
        system_metrics=stage.trains and MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get(),
    ) as run:
        yield run
        run.set_fingerprint(store.fingerprint(*stage.identity))


def find_run(experiment: str, stage: str, fingerprint: str) -> str | None:
    """The newest finished run of `stage` that wrote outputs with this fingerprint."""
    store = client()
    found = store.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = store.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.`{STAGE_TAG}` = {quoted(stage)} and tags.`{FINGERPRINT_TAG}` = "
            f"{quoted(fingerprint)} and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_runs(experiment: str, fingerprints: dict[str, str]) -> dict[str, str | None]:
    """For each stage, its newest finished run that wrote outputs with that fingerprint."""
    return {stage: find_run(experiment, stage, fp) for stage, fp in fingerprints.items()}


def _last_model_id(run: Run) -> str | None:
    outputs = run.outputs
    return outputs.model_outputs[-1].model_id if outputs and outputs.model_outputs else None


def logged_model_id(run_id: str) -> str:
    """The id of the model that `run_id` logged last."""
    model_id = _last_model_id(client().get_run(run_id))
    if model_id is None:
        raise UserError(f"run {run_id} logged no model: rerun its stage (dvc repro --force)")
    return model_id


def pipeline_note(experiment: str, stage_runs: dict[str, str | None], scores: dict) -> str:
    """The pipeline run's description: its test scores and a link to each stage run."""
    experiment_id = client().get_experiment_by_name(experiment).experiment_id
    links = " · ".join(
        f"[{stage}]({run_link(experiment_id, run_id)})" if run_id else f"{stage}: not found"
        for stage, run_id in stage_runs.items()
    )
    accuracies = ", ".join(
        f"{name.removeprefix('accuracy.')} {value:.4f}"
        for name, value in scores.items()
        if name.startswith("accuracy.")
    )
    return (
        f"Pipeline execution `{execution_name()}`: test accuracy {accuracies}.\n\n"
        f"Stage runs: {links}"
    )
