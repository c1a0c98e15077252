"""record: MLflow's side of a pipeline execution, the last stage (`cnnpipe record`).

1. The registry: the model evaluate chose (`reports/evaluate/chosen.json`) is registered from
   the run that trained it, and the `champion` alias moves to it only if it beats the current
   champion on the same test data (registry.py). The champion is re-scored on images
   prepared at its own size when it was trained at another.
2. The pipeline run, named after the DVC experiment (`dvc exp run`) or `workspace` (`dvc
   repro`): every param under the names `dvc exp show` uses (`train.lr`), both models' test
   scores and best val scores (`accuracy.scratch`, `scratch.best_val_accuracy`), the registry's
   decision, and links to the stage runs that produced them, found through the fingerprints
   of their outputs, whether those stages ran now or DVC skipped them or restored them from
   its cache.

Unlike the stages before it, record is MLflow and nothing else: it opens its own run. The
store is outside DVC's view, so DVC runs record on every `dvc repro` (`always_changed`): a
fresh clone's first repro, which reproduces the committed outputs and skips the other
stages, still ends with a registered champion; an execution already recorded is left alone.
"""

from __future__ import annotations

import hashlib
import json

from cnnpipe import layout, metrics, registry, serving, store, tracking, trial
from cnnpipe.params import Params


def scores() -> dict[str, float]:
    """The committed metrics files, flattened as `dvc exp show` names them."""
    found = layout.flatten(store.read_json(layout.EVALUATION / "metrics.json"))
    for model in layout.TRAINED:
        found += layout.flatten(store.read_json(model.metrics), model.name)
    return {name: value for name, value in found if isinstance(value, int | float)}


def version_origin() -> dict[str, str]:
    """Where a registered version comes from: the DVC experiment and the git commit."""
    commit = tracking.git_tags().get("mlflow.source.git.commit", "")
    return {"dvc_exp_name": tracking.execution_name()} | ({"git_commit": commit} if commit else {})


def promote(params: Params, chosen: dict, stage_runs: dict[str, str | None]) -> str:
    """Register the chosen model and gate the champion alias; the registry's decision."""
    trained_by = next(m.stage for m in layout.TRAINED if m.name == chosen["model"])
    producing_run = stage_runs.get(trained_by)
    metric = chosen["metric"]
    if producing_run is None:
        return "not registered: the MLflow run that trained the chosen model was not found."
    if chosen["score"] is None:
        return f"not registered: test {metric} is undefined on this test split."
    candidate = registry.Candidate(
        run_id=producing_run,
        metric=metric,
        score=chosen["score"],
        data_hash=chosen["data_hash"],
        tags={"architecture": chosen["architecture"], "model": chosen["model"]}
        | chosen["privacy"]
        | version_origin(),
        description=f"{chosen['model']} ({chosen['architecture']}): test {metric} "
        f"{chosen['score']:.4f} on {chosen['test_images']} images (data hash "
        f"{chosen['data_hash'][:12]}).",
    )
    test = store.read_split(layout.PREPARED, "test")
    classes = store.read_classes(layout.PREPARED)

    def score_champion(version) -> float | None:
        """The champion on this test split, each image resized to the champion's own size."""
        classifier = serving.load(f"models:/{params.tracking.registered_model}/{version.version}")
        if classifier.meta.classes != classes:
            return None
        probabilities = classifier.probabilities(serving.at_size(test.images, classifier))
        return metrics.score(test.labels, probabilities, classes)[metric]

    return registry.promote(params.tracking.registered_model, candidate, score_champion)


def execution_fingerprint(params: Params) -> str:
    """What identifies a pipeline execution: its experiment name, every param and the
    evaluation's outputs."""
    identity = layout.STAGES["evaluate"].identity
    key = json.dumps(
        [tracking.execution_name(), params.model_dump(mode="json"), store.fingerprint(*identity)],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()


def stage_runs_of_outputs(experiment: str) -> dict[str, str | None]:
    """For each stage, its newest run that wrote the outputs in the workspace (by their
    fingerprint), whether it ran in this execution or an earlier one; None where none did
    (evaluate on a fresh clone, whose committed evaluation DVC keeps)."""
    fingerprints = {
        stage.name: store.fingerprint(*stage.identity)
        for stage in layout.STAGES.values()
        if stage.identity and all(path.exists() for path in stage.identity)
    }
    return tracking.find_runs(experiment, fingerprints)


def run(params: Params) -> None:
    """Record this execution once: a `dvc repro` with nothing new (record runs on every one)
    finds its pipeline run and the registered model, and does nothing more."""
    experiment = params.tracking.experiment
    fingerprint = execution_fingerprint(params)
    recorded = tracking.find_run(experiment, "pipeline", fingerprint)
    if recorded and registry.champion(params.tracking.registered_model) is not None:
        print(f"this pipeline execution is recorded already: MLflow run {recorded}")
        return
    stage_runs = stage_runs_of_outputs(experiment)
    decision = promote(params, store.read_json(layout.CHOSEN), stage_runs)
    with tracking.stage_run(
        "pipeline",
        experiment,
        dict(layout.flatten(params.model_dump(exclude={"tune"}))),
        upstream=stage_runs,
        run_name=tracking.execution_name(),
    ) as mlrun:
        mlrun.set_tags(trial.pipeline_tags())  # a trial of `cnnpipe tune`: a child of its study
        values = scores()
        mlrun.log_metrics(values)
        note = tracking.pipeline_note(experiment, stage_runs, values)
        mlrun.describe(f"{note}\n\nRegistry: {decision}")
        mlrun.set_fingerprint(fingerprint)
    print(f"registry: {decision}")
    print(f"recorded this pipeline execution as MLflow run {mlrun.run_id or '(not sent)'}")
