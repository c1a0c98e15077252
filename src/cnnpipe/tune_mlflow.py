"""A study in MLflow: one parent run per study, named after it, that every trial's pipeline
run (made by `record`, tagged by trial.py) is a child of. The parent holds the search space,
the best value after each trial (a metric series over trial numbers), the best params (tags,
which a later best may change) and Optuna's figures: optimisation history, param importances,
parallel coordinates."""

from __future__ import annotations

import time

import optuna
from mlflow.entities import Param
from optuna.trial import FrozenTrial, TrialState

from cnnpipe import plots, tracking
from cnnpipe.params import TuneParams

PARENT_ATTR = "mlflow_run"  # the study's user attribute holding its MLflow run id
WAIT_S = 60  # how long a joining worker waits for the creating one to make the run


def describe_entry(entry) -> str:
    if entry.choices is not None:
        text = "one of " + ", ".join(str(c) for c in entry.choices)
    else:
        text = f"{entry.low} .. {entry.high}" + (" (log)" if entry.log else "")
        text += f" step {entry.step}" if entry.step else ""
    conditions = "; ".join(f"{k} in {v}" for k, v in entry.when.items())
    return text + (f" when {conditions}" if conditions else "")


def parent_run(study: optuna.Study, experiment: str, tune: TuneParams, created: bool) -> str:
    """The study's MLflow run: made by the worker that created the study, found by the others
    through the study's user attribute."""
    client = tracking.client(experiment)
    if not created:
        deadline = time.monotonic() + WAIT_S
        while PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(1)
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    note = (
        f"Optuna study **{study.study_name}**: {tune.trials} trials, sampler {tune.sampler}, "
        f"pruner {tune.pruner}, {study.direction.name.lower()} the best epoch's "
        f"{tune.metric} of the {tune.target} model. Its trials' pipeline runs are its children."
    )
    tags = tracking.git_tags() | {
        tracking.STAGE_TAG: "study",
        "cnnpipe.study": study.study_name,
        "mlflow.note.content": note,
    }
    run = client.create_run(experiment_id, tags=tags, run_name=study.study_name)
    settings = tune.model_dump(exclude={"space", "storage", "jobs"})
    params = [Param(f"tune.{k}", str(v)) for k, v in settings.items()]
    params += [Param(f"space.{k}", describe_entry(e)) for k, e in tune.space.items()]
    client.log_batch(run.info.run_id, params=params)
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


def log_trial(run_id: str, study: optuna.Study, finished: FrozenTrial) -> None:
    """After a trial: the study's best value so far, at the trial's number."""
    client = tracking.client()
    metric = study.user_attrs.get("metric", "value")
    if finished.state == TrialState.COMPLETE:
        client.log_metric(run_id, f"trial_{metric}", finished.value, step=finished.number)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if done:
        client.log_metric(run_id, f"best_{metric}", study.best_value, step=finished.number)


def figures(study: optuna.Study) -> dict:
    """Optuna's figures of the study, by artifact name: none before a trial has finished
    (Optuna would warn and draw empty axes); importances need two finished trials and two
    params that vary."""
    from optuna.visualization import matplotlib as optuna_plots

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return {}
    found = {"optuna/optimization_history.png": optuna_plots.plot_optimization_history(study)}
    if len(done) >= 2:
        found["optuna/parallel_coordinate.png"] = optuna_plots.plot_parallel_coordinate(study)
        varied = {k for t in done for k in t.params if t.params[k] != done[0].params.get(k)}
        if varied:
            found["optuna/param_importances.png"] = optuna_plots.plot_param_importances(study)
    return {name: getattr(ax, "figure", None) or ax.flat[0].figure for name, ax in found.items()}


def summarise(run_id: str, study: optuna.Study) -> None:
    """The best trial's params (tags) and Optuna's figures on the study's run; the run ends
    when no trial of the study is running any more (another worker may still be)."""
    client = tracking.client()
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if done:
        best = study.best_trial
        tags = {f"best.{k}": str(v) for k, v in best.params.items()}
        tags |= {"best.trial": str(best.number), "best.experiment": best.user_attrs["experiment"]}
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    for name, figure in figures(study).items():
        client.log_figure(run_id, figure, name)
        plots.close(figure)
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        client.set_terminated(run_id, "FINISHED")
