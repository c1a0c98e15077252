"""The whole pipeline on class folders whose names are markup, TeX, table syntax and the
served model's own column names: every stage, `cnnpipe predict` and the report take them as
data and give them back exactly."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnpipe import tracking
from conftest import BIN, TINY, copy_repo, digit_images, write_params
from shell import run
from test_hostile_names import markdown_cells

pytestmark = pytest.mark.e2e

NAMES = ["<img src=x onerror=alert(1)>", "$\\frac{1}{2}$", "a|b", "probability", "class"]


def test_hostile_class_names_go_through_every_stage_and_come_back(tmp_path):
    data = tmp_path / "data"
    for digit, name in enumerate(NAMES):
        (data / name).mkdir(parents=True)
        for i, image in enumerate(digit_images(digit, 25, size=16)):
            image.save(data / name / f"{i:02d}.png")
    repo = copy_repo(tmp_path / "repo")
    write_params(repo, TINY | {"data.source": f"folder:{data}"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run([str(BIN / "dvc"), "repro"], repo, MLFLOW_TRACKING_URI=uri)

    answered = run(
        ["cnnpipe", "predict", str(data / NAMES[0] / "00.png")], repo, MLFLOW_TRACKING_URI=uri
    )
    [line] = answered.stdout.strip().splitlines()
    predicted = re.fullmatch(r".*00\.png: (.*) \(\d\.\d{3}\)", line)[1]
    assert predicted in NAMES, line

    report = (repo / "reports" / "report.md").read_text()
    per_class = report.split("## Per class")[1].split("\n## ")[0]
    assert set(markdown_cells(per_class)) >= set(NAMES)

    client = MlflowClient(uri)
    [evaluation] = client.search_runs(
        [client.get_experiment_by_name("cnnpipe").experiment_id],
        f"tags.`{tracking.STAGE_TAG}` = 'evaluate'",
    )
    page = Path(client.download_artifacts(evaluation.info.run_id, "report.html", str(tmp_path)))
    text = page.read_text()
    assert "<img src=x" not in text and html.escape(NAMES[0]) in text
