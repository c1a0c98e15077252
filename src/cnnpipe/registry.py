"""The MLflow model registry: registering the chosen model and the `champion` alias gate.

A model is registered from the run that trained it. The alias `champion` moves to a new
version only when it beats the current champion on the same test data (by the champion's
version tags when they were measured on data with the same hash, else measured afresh), and
the whole decision is taken under a lock, so records that finish together take turns.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from sqlalchemy.exc import SQLAlchemyError

from cnnpipe import tracking
from cnnpipe.errors import UserError, first_line

GATE_TAG = "gate"  # on every version: how the champion gate decided about it
CHAMPION = "champion"


@dataclass(frozen=True)
class Candidate:
    """The model evaluate chose, as the registry sees it."""

    run_id: str  # the run that trained and logged it
    metric: str  # the metric that decides (evaluate.select_metric)
    score: float  # its test value of `metric`
    data_hash: str  # the test data it was measured on
    tags: dict[str, str]  # more facts for the version (architecture, ...)
    description: str  # the version's description in the MLflow UI


@contextlib.contextmanager
def champion_gate() -> Iterator[None]:
    """Held while record registers a model and decides who holds the champion alias.

    Experiments that finish together (`dvc queue start -j 2`) would otherwise both find no
    champion and both create the alias (a unique-constraint error in the registry), or both
    compare against the same old champion. This orders the records of one repository (queue
    copies included); machines that share only a tracking server are not ordered by it.
    """
    root = tracking.repo_root()
    folder = root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else root
    folder.mkdir(exist_ok=True)
    with FileLock(str(folder / "cnnpipe-champion.lock")):
        yield


def champion(registered_model: str) -> ModelVersion | None:
    """The version that holds the `champion` alias; None when the registry answers that there
    is none. A registry that fails (a database error, a server's error page, a file that is
    no database) is a one-line `UserError` that says so: it is not "no champion"."""
    try:
        return tracking.client().get_model_version_by_alias(registered_model, CHAMPION)
    except MlflowException as err:
        if _not_found(err):
            return None
        reason = err.message
    except (OSError, SQLAlchemyError) as err:
        reason = first_line(err)
    raise UserError(
        f"the model registry in {tracking.tracking_uri()} failed while looking up the "
        f"champion of '{registered_model}': {reason}"
    )


def _not_found(err: MlflowException) -> bool:
    """Whether `err` is the registry's answer that the model, or its alias, does not exist."""
    code = err.error_code
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in err.message
    )


def register(registered_model: str, candidate: Candidate) -> ModelVersion:
    """Register the model logged by the candidate's run (once: a run already registered keeps
    its version), tagged with the test data hash and its test score, and described."""
    client = tracking.client()
    if not client.search_registered_models(f"name = {tracking.quoted(registered_model)}"):
        client.create_registered_model(
            registered_model,
            description="cnnpipe's image classifier: each version is the better of the scratch "
            "and transfer models of one evaluation; the alias `champion` marks the best so far.",
        )
    name, run_id = tracking.quoted(registered_model), tracking.quoted(candidate.run_id)
    existing = client.search_model_versions(f"name = {name} and run_id = {run_id}")
    version = existing[0] if existing else _new_version(registered_model, candidate)
    tags = candidate.tags | {
        "data_hash": candidate.data_hash,
        f"test_{candidate.metric}": repr(candidate.score),
    }
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version.version, key, value)
    return client.get_model_version(registered_model, version.version)


def _new_version(registered_model: str, candidate: Candidate) -> ModelVersion:
    model_id = tracking.logged_model_id(candidate.run_id)
    version = tracking.client().create_model_version(
        registered_model,
        f"models:/{model_id}",
        run_id=candidate.run_id,
        description=candidate.description,
        model_id=model_id,
    )
    _list_on_logged_model(model_id, version)
    return version


def _list_on_logged_model(model_id: str, version: ModelVersion) -> None:
    """Add the version to the logged model's list of its versions, as a tracking server does
    when it creates one (a local store's client does not): the logged model's page shows it
    as registered, with its versions, only from that list."""
    client = tracking.client()
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if any((e["name"], str(e["version"])) == (version.name, str(version.version)) for e in listed):
        return  # a server listed it already
    entry = {"name": version.name, "version": version.version}
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})


def promote(
    registered_model: str,
    candidate: Candidate,
    score_champion: Callable[[ModelVersion], float | None],
) -> str:
    """Register `candidate`; move `champion` to it only if it beats the champion. Returns the
    sentence the report shows. `score_champion(version)` measures the champion on the
    candidate's test data (None when it predicts other classes: then the two cannot be
    compared, and the candidate, trained on the data of today, takes the alias)."""
    if not math.isfinite(candidate.score):
        return f"not registered: its test {candidate.metric} is not a number ({candidate.score})."
    with champion_gate():
        version = register(registered_model, candidate).version
        current = champion(registered_model)
        if current is not None and current.version == version:
            return (
                f"version {version} of `{registered_model}` (this model) is already the champion."
            )
        sentence = _decide(registered_model, version, current, candidate, score_champion)
        tracking.client().set_model_version_tag(registered_model, version, GATE_TAG, sentence)
        return sentence


def _decide(
    registered_model: str,
    version: str,
    current: ModelVersion | None,
    candidate: Candidate,
    score_champion: Callable[[ModelVersion], float | None],
) -> str:
    """Move `champion` from `current` to `version` if it wins; the sentence that says what
    happened (also the version's `gate` tag: a losing candidate is registered, and says so)."""
    metric, value = candidate.metric, candidate.score
    if current is None:
        make_champion(registered_model, version)
        return (
            f"version {version} of `{registered_model}` is the first champion "
            f"(test {metric} {value:.4f})."
        )
    held = _champion_score(current, candidate, score_champion)
    if held is None:
        make_champion(registered_model, version)
        return (
            f"champion moved to version {version} without a comparison: version "
            f"{current.version} was trained on other classes, so their scores cannot be "
            "compared, and the model of the current data wins."
        )
    if value > held:
        make_champion(registered_model, version)
        return (
            f"champion moved to version {version}: test {metric} {value:.4f} beats "
            f"version {current.version}'s {held:.4f} on the same test data."
        )
    return (
        f"champion stays version {current.version}: its test {metric} {held:.4f} on the "
        f"same test data is not beaten by version {version}'s {value:.4f}."
    )


def _champion_score(
    current: ModelVersion, candidate: Candidate, score_champion: Callable
) -> float | None:
    """The champion's value of the metric on the candidate's test data: from its tags when it
    was measured on the same data, else measured now."""
    tag = f"test_{candidate.metric}"
    if current.tags.get("data_hash") == candidate.data_hash and tag in current.tags:
        return float(current.tags[tag])
    return score_champion(current)


def make_champion(registered_model: str, version: str) -> None:
    tracking.client().set_registered_model_alias(registered_model, CHAMPION, version)


def champion_uri(registered_model: str) -> str:
    """The champion's model URI, or a clear error when there is none yet."""
    return version_uri(required_champion(registered_model))


def version_uri(version: ModelVersion) -> str:
    return f"models:/{version.name}/{version.version}"


def required_champion(registered_model: str) -> ModelVersion:
    """The champion's version, or a clear error when there is none yet."""
    found = champion(registered_model)
    if found is None:
        raise UserError(
            f"no champion of '{registered_model}' in {tracking.tracking_uri()}: the record "
            "stage registers one when `dvc repro` runs it (a fresh clone's first repro may "
            "skip it; then run `dvc repro -f -s record`), or pass --model models/scratch"
        )
    return found
