"""The stage runner, `cnnpipe <stage>`: a stage run before the stages that make its inputs
stops in one line that says which input is missing and what to run."""

from __future__ import annotations

import pytest

from cnnpipe import cli, layout
from conftest import REPO


@pytest.mark.parametrize(
    "stage", [s for s in layout.STAGES.values() if s.deps], ids=lambda s: s.name
)
def test_a_stage_without_its_inputs_says_what_to_run(stage, tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert cli.main([stage.name]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    first = stage.deps[0]
    assert line.startswith(f"cnnpipe {stage.name}: error: {first} is missing (the "), line
    assert f"run dvc repro {stage.name}, which runs the stages before it" in line
