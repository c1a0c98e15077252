"""Params can't hang: any value of any key either validates or fails in one short line within
a second, YAML aliases are refused, and no fractions that validate leave prepare without a
bound."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpipe import retrain
from cnnpipe.errors import MAX_MESSAGE, UserError
from cnnpipe.params import load_params
from cnnpipe.stages import prepare
from conftest import REPO

REPOSITORY_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def key_paths(table: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Every leaf's path of keys (a key may hold dots: the search space's `train.lr`)."""
    paths = []
    for key, value in table.items():
        inner = isinstance(value, dict) and value
        paths += key_paths(value, (*prefix, key)) if inner else [(*prefix, key)]
    return paths


KEYS = key_paths(REPOSITORY_PARAMS)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def with_value(key: tuple[str, ...] | str, value: object) -> dict:
    params = yaml.safe_load(yaml.safe_dump(REPOSITORY_PARAMS))
    *sections, leaf = key.split(".") if isinstance(key, str) else key
    table = params
    for section in sections:
        table = table[section]
    table[leaf] = value
    return params


def validates_or_one_line(path: Path) -> None:
    started = time.perf_counter()
    try:
        load_params(path)
    except UserError as error:
        message = str(error)
        assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    assert time.perf_counter() - started < 1


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(KEYS), VALUES)
def test_any_value_of_any_key_validates_or_fails_in_one_short_line(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(with_value(key, value), allow_unicode=True))
    validates_or_one_line(path)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=400))
def test_any_text_as_params_validates_or_fails_in_one_short_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    validates_or_one_line(path)


@pytest.mark.parametrize(
    "text",
    [
        'a: &a ["x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\n'
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c]\n",
        "seed: " + "9" * 5000,
        "[" * 20000 + "]" * 20000,
        "x: " + "y" * 100_000,
    ],
    ids=["alias bomb", "huge integer", "deep nesting", "huge value"],
)
def test_hostile_yaml_is_one_short_line_at_once(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(UserError):
        load_params(path)
    validates_or_one_line(path)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("train.privacy.max_grad_norm", float("inf"), "finite number"),
        ("train.privacy.epsilon", 1e9, "a budget from 0.01 to 100"),
        ("train.privacy.epsilon", float("nan"), "a budget from 0.01 to 100"),
        ("transfer.privacy.delta", 1e-300, "a number from 1e-12 up to 1"),
        ("train.lr", float("nan"), "finite number"),
        ("transfer.backbone_lr", 1e-30, "greater than or equal"),
        ("tracking.experiment", "../../outside", "a plain name"),
        ("tracking.experiment", "..", "a plain name"),
        ("data.val_fraction", 0.45, "leave 0.09 of the images for training"),
    ],
)
def test_values_that_would_hang_or_escape_are_refused(tmp_path, key, value, said):
    path = tmp_path / "params.yaml"
    params = with_value(key, value)
    if key == "data.val_fraction":
        params["data"]["test_fraction"] = 0.46
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=said):
        load_params(path)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.001, 0.4999),
    st.floats(0.001, 0.4999),
    st.lists(st.integers(1, 60), min_size=2, max_size=6),
)
def test_the_class_size_check_ends_for_fractions_that_validate(val, test, sizes):
    """Fractions that leave a tenth for training: the check ends at once, and a split it lets
    through gives every class an image in every split."""
    if 1 - val - test < 0.1:
        return
    labels = np.repeat(np.arange(len(sizes)), sizes)
    started = time.perf_counter()
    try:
        splits = prepare.split_indices(labels, [str(c) for c in sizes], val, test, seed=0)
    except UserError as error:
        assert "\n" not in str(error)
    else:
        for rows in splits.values():
            assert set(labels[rows]) == set(range(len(sizes)))
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("train.lr=abc", "the overrides: train.lr = 'abc': Input should be a valid number"),
        ("train.lrr=0.1", "train.lrr is not a key of params.yaml (check its spelling)"),
        ("train.epochs=0", "the overrides: train.epochs = 0: Input should be greater than"),
        ("train.lr", "-S train.lr: write -S section.key=value"),
    ],
)
def test_a_wrong_override_stops_retrain_before_anything_is_written_or_run(
    tmp_path, monkeypatch, capsys, override, said
):
    """`dvc exp run -S` would write it into params.yaml and the stages would fail on it,
    having removed their outputs first."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert retrain.main(["-S", override]) == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert out == "" and line.startswith("cnnpipe retrain: error: ") and said in line
    assert params.read_text() == (REPO / "params.yaml").read_text()


@pytest.mark.parametrize("kind", ["pipe", "device", "huge"])
def test_a_params_file_that_is_no_file_or_far_too_big_is_one_line(tmp_path, kind):
    """A pipe would block the read and /dev/zero would never end it."""
    path = tmp_path / "params.yaml"
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.write_text("seed: 1\n" + "#" * 2_000_000)
    said = "is over 1,048,576 bytes" if kind == "huge" else "is not a regular file"
    with pytest.raises(UserError, match=said):
        load_params(path)
