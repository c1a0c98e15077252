import subprocess
import sys

import pytest

from cnnpipe.errors import UserError
from cnnpipe.params import load_params
from conftest import REPO, write_params


def test_repository_params_are_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "builtin:digits"
    assert params.train.device in {"auto", "cpu", "cuda"}
    assert params.transfer.backbone == "efficientnet_lite0"
    assert params.transfer.weights == "imagenet"
    assert params.tracking.experiment


def test_every_key_in_params_yaml_has_a_comment():
    for line in (REPO / "params.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and line.startswith(" "):
            assert "#" in line, f"uncommented key: {line.strip()}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train": {"epochs": 0}}, "train.epochs = 0: Input should be greater than or equal to 1"),
        ({"train": {"epochs": "many"}}, "train.epochs = 'many'"),
        ({"train": {"device": "tpu"}}, "train.device = 'tpu': Input should be 'auto', 'cpu' or"),
        ({"train": {"colour": 1}}, "unknown key 'train.colour'"),
        ({"surprise": 1}, "unknown key 'surprise'"),
        ({"data": {"source": "s3://bucket"}}, "data.source = 's3://bucket': Value error, must be"),
        ({"transfer": {"frozen_epochs": 0, "finetune_epochs": 0}}, "transfer = "),
    ],
)
def test_bad_params_name_key_value_and_what_is_allowed(tmp_path, overrides, expected):
    write_params(tmp_path, overrides)
    with pytest.raises(UserError) as caught:
        load_params(tmp_path / "params.yaml")
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_cli_reports_bad_params_in_one_line_without_traceback(tmp_path):
    write_params(tmp_path, {"data": {"image_size": 4}})
    result = subprocess.run(
        [sys.executable, "-m", "cnnpipe", "prepare"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "data.image_size = 4" in lines[0] and "greater than or equal to 8" in lines[0]
    assert not (tmp_path / "data").exists()
