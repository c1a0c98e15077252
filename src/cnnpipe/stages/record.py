"""record: one MLflow run per pipeline execution, the row to compare executions by.

Named after the DVC experiment (`dvc exp run`) or `workspace` (`dvc repro`), it holds every
param under the names `dvc exp show` uses (`train.lr`), both models' test scores and best val
scores (`accuracy.scratch`, `scratch.best_val_accuracy`), and links to the stage runs that
produced them, found through the evaluation's fingerprint, whether those stages ran now or
DVC skipped them or restored them from its cache.
"""

from __future__ import annotations

import mlflow

from cnnpipe import layout, store, tracking, trial
from cnnpipe.params import Params


def scores() -> dict[str, float]:
    """The committed metrics files, flattened as `dvc exp show` names them."""
    found = layout.flatten(store.read_json(layout.EVALUATION / "metrics.json"))
    for model in layout.TRAINED:
        found += layout.flatten(store.read_json(model.metrics), model.name)
    return {name: value for name, value in found if isinstance(value, int | float)}


def run(params: Params) -> None:
    experiment = params.tracking.experiment
    evaluation = tracking.find_run(experiment, "evaluate", store.fingerprint(*layout.EVALUATED))
    stage_runs = tracking.lineage(evaluation)
    with tracking.stage_run(
        "pipeline",
        experiment,
        dict(layout.flatten(params.model_dump(exclude={"tune"}))),
        upstream=stage_runs,
        run_name=tracking.execution_name(),
    ) as mlrun:
        if mlrun.run_id and (trial_tags := trial.pipeline_tags()):
            mlflow.set_tags(trial_tags)  # a trial of `cnnpipe tune`: a child of its study's run
        values = scores()
        mlrun.log_metrics(values)
        mlrun.describe(tracking.pipeline_note(experiment, stage_runs, values))
    print(f"recorded this pipeline execution as MLflow run {mlrun.run_id or '(not sent)'}")
