"""The `tune` section and the parts of `cnnpipe tune` that need no DVC run: the search space
(ranges, log scale, choices, conditions) as Optuna samples it, the overrides, and writing the
best params into params.yaml in place."""

from __future__ import annotations

import optuna
import pytest
import yaml

from cnnpipe import tune
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
