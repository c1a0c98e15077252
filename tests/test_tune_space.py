"""The `tune` section and the parts of `cnnpipe tune` that need no pipeline run: the search
space (ranges, log scale, choices, conditions) as Optuna samples it, the overrides, writing the
best params into params.yaml in place, and a worker that stops on a search that cannot run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cnnpipe import cli, tune
from cnnpipe.errors import UserError
from cnnpipe.params import TuneParams, load_params
from conftest import REPO

BASE = load_params(REPO / "params.yaml").tune.model_dump()


def tune_params(**changes) -> TuneParams:
    return TuneParams.model_validate(BASE | changes)


def test_conditional_entries_are_sampled_only_where_their_condition_holds():
    space = {
        "train.privacy.epsilon": {"choices": [0, 8.0]},
        "train.privacy.lr": {
            "low": 0.001,
            "high": 0.01,
            "log": True,
            "when": {"train.privacy.epsilon": [8.0]},
        },
        "train.batch_size": {"low": 16, "high": 64, "step": 16},
    }
    params = tune_params(space=space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(20):
        sampled = tune.sample(study.ask(), params)
        seen.append(sampled)
        assert ("train.privacy.lr" in sampled) == (sampled["train.privacy.epsilon"] == 8.0)
        assert sampled["train.batch_size"] in (16, 32, 48, 64)
        assert isinstance(sampled["train.batch_size"], int)
        if "train.privacy.lr" in sampled:
            assert 0.001 <= sampled["train.privacy.lr"] <= 0.01
    assert {s["train.privacy.epsilon"] for s in seen} == {0, 8.0}


@pytest.mark.parametrize(
    ("space", "sampler", "says"),
    [
        ({"train.lr": {"low": 0.1, "high": 0.01}}, "tpe", "must be below high"),
        ({"train.lr": {"low": 0, "high": 0.01, "log": True}}, "tpe", "needs low > 0"),
        ({"train.lr": {"low": 0.1}}, "tpe", "either choices"),
        ({"train.lr": {"choices": [0.1], "low": 0.1, "high": 1}}, "tpe", "either choices"),
        ({"train.lr": {"low": 0.001, "high": 0.1}}, "grid", "grid needs choices"),
        (
            {"train.lr": {"choices": [0.1], "when": {"train.model": ["small_cnn"]}}},
            "tpe",
            "must come earlier",
        ),
        ({"tune.trials": {"choices": [1, 2]}}, "tpe", "cannot change the tune section"),
    ],
)
def test_a_bad_space_is_refused_with_the_reason(space, sampler, says):
    with pytest.raises(ValueError, match=says):
        tune_params(space=space, sampler=sampler)


def test_overrides_split_into_the_search_and_every_trial(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    config = tune.settings(
        ["train.epochs=2", "tune.pruner=none", "data.image_size=16"],
        trials=3,
        jobs=2,
        storage=None,
        study="s1",
    )
    assert config.overrides == {"train.epochs": 2, "data.image_size": 16}
    assert (config.tune.trials, config.tune.jobs, config.tune.pruner, config.tune.study) == (
        3,
        2,
        "none",
        "s1",
    )
    assert config.storage.startswith("sqlite:///") and config.storage.endswith("/tune.db")
    for bad, says in [
        (["train.epoch=2"], "train.epoch is not a key"),
        (["tune.sampler=annealing"], "the overrides"),
        (["train.epochs"], "write -S section.key=value"),
        (  # a value a trial could draw that the stages would refuse
            ['tune.space={"train.epochs": {"low": 1, "high": 100000}}'],
            r"tune.space.train.epochs = 100000: train.epochs = 100000: Input should be less",
        ),
        (['tune.space={"train.batch_size": {"choices": [64, 0]}}'], "batch_size = 0"),
    ]:
        with pytest.raises(UserError, match=says):
            tune.settings(bad, None, None, None, None)
    with pytest.raises(UserError, match="jobs"):
        tune.settings([], None, 0, None, None)


def test_the_best_params_are_written_in_place_keeping_comments():
    text = (REPO / "params.yaml").read_text()
    changed = tune.set_in_place(text, "train.lr", 0.0123)
    changed = tune.set_in_place(changed, "train.privacy.epsilon", 8.0)
    changed = tune.set_in_place(changed, "transfer.batch_size", 32)
    before, after = text.splitlines(), changed.splitlines()
    differing = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert len(differing) == 3
    for old, new in differing:  # the comment stays, in its column
        assert old.index("#") == new.index("#") and old.split("#", 1)[1] == new.split("#", 1)[1]
    parsed = yaml.safe_load(changed)
    assert parsed["train"]["lr"] == 0.0123 and parsed["train"]["privacy"]["epsilon"] == 8.0
    assert parsed["transfer"]["batch_size"] == 32 and parsed["transfer"]["lr"] == 0.003
    assert parsed["train"]["batch_size"] == yaml.safe_load(text)["train"]["batch_size"]
    with pytest.raises(UserError, match="train.nothing"):
        tune.set_in_place(text, "train.nothing", 1)


def test_no_stage_reads_the_tune_section():
    from cnnpipe import layout

    for stage in layout.STAGES.values():
        assert not any(key.split(".")[0] == "tune" for key in stage.params), stage.name


def test_a_stage_reports_its_epochs_and_stops_when_pruned(tmp_path, monkeypatch):
    from optuna.trial import TrialState

    from cnnpipe import trial

    monkeypatch.delenv(trial.TRIAL_ENV, raising=False)
    assert trial.epoch_reporter("train") is None  # not a trial: nothing to report
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for scores in ([0.8, 0.9], [0.7, 0.95]):  # two finished trials learnt
        done = study.ask()
        for epoch, score in enumerate(scores, 1):
            done.report(score, epoch)
        study.tell(done, max(scores))
    first, second = study.ask(), study.ask()

    def reporter(stage: str, asked=first, warmup: int = 0, target: str = "champion"):
        link = trial.TrialLink(
            storage,
            "s",
            asked._trial_id,
            asked.number,
            "val_accuracy",
            target,
            "median",
            1,
            warmup,
            None,
        )
        monkeypatch.setenv(*link.to_env().popitem())
        return trial.epoch_reporter(stage)

    assert reporter("transfer", target="scratch")(1, 0.1) is False  # not scored: no report
    assert reporter("train", warmup=1)(1, 0.1) is False  # still warming up
    report = reporter("train")
    assert report.metric == "val_accuracy"
    assert report(2, 0.93) is False  # above the finished trials' median at epoch 2 (0.925)
    assert report(3, 0.5) is False  # no other trial reached epoch 3
    assert study.get_trials()[first.number].intermediate_values == {1: 0.1, 2: 0.93, 3: 0.5}
    assert reporter("train", second)(2, 0.5) is True  # below the median: pruned
    assert study.get_trials()[second.number].user_attrs["pruned"] == {"stage": "train", "epoch": 2}
    assert reporter("transfer", second)(1, 0.99) is True  # a later stage of a pruned trial stops
    study.tell(first, state=TrialState.FAIL)  # e.g. its worker died and the trial was retried
    assert reporter("train")(4, 0.99) is True


@pytest.fixture
def no_pipeline(tmp_path, monkeypatch, mlflow_store) -> Path:
    """A committed params.yaml in a DVC folder with no pipeline: its experiments fail at once."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / ".dvc").mkdir()
    author = ["-c", "user.name=cnnpipe", "-c", "user.email=cnnpipe@localhost"]
    for command in (["init", "-q"], ["add", "params.yaml"], [*author, "commit", "-qm", "params"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tune_in(folder: Path, *pairs: str) -> int:
    storage = f"sqlite:///{folder / 'study.db'}"
    return cli.main(["tune", "--trials", "5", "--storage", storage, "-S", "tune.sampler=random",
                     *(arg for pair in pairs for arg in ("-S", pair))])  # fmt: skip


def trial_states(folder: Path) -> list[TrialState]:
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'study.db'}")
    return [t.state for t in study.get_trials()]


def test_a_worker_whose_trials_keep_failing_stops_with_the_reason(no_pipeline, capsys):
    """A failed trial is not counted (its params are retried), so a study whose every trial
    fails would start experiments for ever: the worker stops after a few in a row."""
    assert tune_in(no_pipeline) == 2
    printed = capsys.readouterr()
    assert (
        printed.err.strip()
        .splitlines()[-1]
        .startswith(
            f"cnnpipe tune: error: {tune.FAILED_IN_A_ROW} trials in a row failed, the last one so: "
            "dvc exp run exited 255: "
        )
    )
    assert "dvc.yaml' does not exist" in printed.err and "Traceback" not in printed.err
    assert trial_states(no_pipeline) == [TrialState.FAIL] * tune.FAILED_IN_A_ROW


def test_drawn_values_that_do_not_fit_together_start_no_experiment(no_pipeline, capsys):
    """Each value alone passes (checked at start-up); together the params refuse them."""
    space = '{"transfer.epochs": {"choices": [2]}, "transfer.frozen_epochs": {"choices": [3]}}'
    assert tune_in(no_pipeline, f"tune.space={space}") == 2
    printed = capsys.readouterr()
    assert "trial 0 not run: the params it drew: transfer: frozen_epochs (3) cannot exceed" in (
        printed.out
    )
    assert (
        printed.err.strip()
        .splitlines()[-1]
        .startswith(
            f"cnnpipe tune: error: {tune.REFUSED_IN_A_ROW} combinations in a row drawn from "
            "tune.space were refused, the last one so: "
        )
    )
    assert not (no_pipeline / tune.LOGS).exists()  # no experiment was started
    assert trial_states(no_pipeline) == [TrialState.FAIL] * tune.REFUSED_IN_A_ROW
