"""`cnnpipe tune` on the tiny faces pipeline: trials run side by side as DVC experiments, a
learning rate that cannot learn is pruned from its val scores, the study is one MLflow parent
run with the trials' pipeline runs as children, and the best trial is shown and applied."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from shell import run
from test_experiments import experiments

pytestmark = pytest.mark.e2e

GOOD_LR, STUCK_LR = 0.01, 1e-7  # 1e-7: the weights barely move in 3 epochs
# The trial runs the tiny preset's (the baseline's) scratch model for 3 epochs; the random
# sampler is seeded by `seed`, so the trials' learning rates come in one order: stuck, good,
# good, stuck. The last starts after both first trials finished, and trails them at epoch 1.
TUNE = [
    "-S", "train.epochs=3",
    "-S", "tune.target=scratch",
    "-S", "tune.sampler=random",
    "-S", "tune.startup_trials=1",
    "-S", "tune.warmup_epochs=0",
    "-S", f'tune.space={{"train.lr": {{"choices": [{GOOD_LR}, {STUCK_LR}]}}}}',
]  # fmt: skip


def git_json(repo, experiment: str, path: str) -> dict:
    """A committed JSON file of a DVC experiment (its git ref is refs/exps/.../<name>)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    (ref,) = [r for r in refs if r.endswith(f"/{experiment}")]
    return json.loads(run(["git", "show", f"{ref}:{path}"], repo).stdout)


def test_a_study_of_dvc_experiments_prunes_and_lands_in_mlflow(faces_repo):
    done = run(["cnnpipe", "tune", "--trials", "4", "--jobs", "2", *TUNE], faces_repo)
    assert "trial 3 (search-3) pruned" in done.stdout, done.stdout + done.stderr

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{faces_repo}/tune.db")
    trials = study.get_trials()
    assert [t.params["train.lr"] for t in trials] == [STUCK_LR, GOOD_LR, GOOD_LR, STUCK_LR]
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED]
    assert trials[3].user_attrs["pruned"] == {"stage": "train", "epoch": 1}

    shown = experiments(json.loads(run(["dvc", "exp", "show", "--json"], faces_repo).stdout))
    assert set(shown) == {f"search-{n}" for n in range(4)}
    for name, data in shown.items():
        lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
        assert lr == trials[int(name.split("-")[1])].params["train.lr"]
    evaluated = {n: d["metrics"]["reports/evaluate/metrics.json"]["data"] for n, d in shown.items()}
    assert evaluated["search-3"]["pruned_at_epoch"] == {"scratch": 1}  # a column of exp show
    assert "pruned_at_epoch" not in evaluated["search-1"]
    pruned = git_json(faces_repo, "search-3", "reports/train/metrics.json")
    assert pruned["pruned_at_epoch"] == 1 and pruned["best_epoch"] == 1
    assert "pruned_at_epoch" not in git_json(faces_repo, "search-1", "reports/train/metrics.json")

    client = MlflowClient(f"sqlite:///{faces_repo / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("cnnpipe").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cnnpipe.stage") == "study"]
    assert parent.info.run_name == "search" and parent.info.status == "FINISHED"
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(shown)
    assert children["search-3"].data.tags["cnnpipe.trial_state"] == "pruned"
    assert children["search-3"].data.metrics["scratch.pruned_at_epoch"] == 1
    assert children["search-1"].data.params["train.lr"] == str(GOOD_LR)
    assert parent.data.params["space.train.lr"] == f"one of {GOOD_LR}, {STUCK_LR}"
    assert parent.data.tags["best.train.lr"] == str(GOOD_LR)
    best = client.get_metric_history(parent.info.run_id, "best_val_accuracy")
    assert max(m.value for m in best) == study.best_value
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert figures == {
        "optuna/optimization_history.png",
        "optuna/parallel_coordinate.png",
        "optuna/param_importances.png",
    }

    shown_best = run(["cnnpipe", "tune", "--best"], faces_repo).stdout
    best_name = study.best_trial.user_attrs["experiment"]
    assert f"DVC experiment {best_name}" in shown_best
    run(["cnnpipe", "tune", "--apply"], faces_repo)
    assert yaml.safe_load((faces_repo / "params.yaml").read_text())["train"]["lr"] == GOOD_LR
    run(["git", "checkout", "params.yaml"], faces_repo)
    run(["dvc", "exp", "apply", best_name], faces_repo)  # the trial, reproducible by DVC
    applied = yaml.safe_load((faces_repo / "params.yaml").read_text())
    assert applied["train"]["lr"] == GOOD_LR and applied["train"]["epochs"] == 3
