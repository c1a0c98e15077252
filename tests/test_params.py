import subprocess
import sys

import pytest
import yaml

from cnnpipe import layout, models
from cnnpipe.errors import UserError
from cnnpipe.params import Params, load_params, preset
from conftest import REPO, write_params

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_load_with_every_value_from_the_file():
    params = load_params(REPO / "params.yaml")
    for section, values in PARAMS.items():
        if isinstance(values, dict):
            assert getattr(params, section).model_dump() == values, section
        else:
            assert getattr(params, section) == values


def test_no_param_has_a_default_in_code():
    """params.yaml is the only source of values: a default in code could silently differ."""

    def fields(model) -> list:
        found = []
        for name, field in model.model_fields.items():
            found.append((f"{model.__name__}.{name}", field.is_required()))
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                found += fields(annotation)
        return found

    assert all(required for _, required in fields(Params)), fields(Params)


def test_every_key_in_params_yaml_has_a_comment():
    for line in (REPO / "params.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and line.startswith(" "):
            assert "#" in line, f"uncommented key: {line.strip()}"


def test_allowed_models_come_from_the_model_table(tmp_path):
    assert models.names("train") == ["seed_cnn", "small_cnn"]
    assert "efficientnet_lite0" in models.names("transfer")
    write_params(tmp_path, {"train.model": "resnet18"})
    with pytest.raises(UserError, match=r"train.model = 'resnet18': .*seed_cnn, small_cnn"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.epochs": 0}, "train.epochs = 0: Input should be greater than or equal to 1"),
        ({"train.epochs": "many"}, "train.epochs = 'many': Input should be a valid integer"),
        ({"train.epochs": True}, "train.epochs = True: Input should be a valid integer"),
        ({"train.lr": True}, "train.lr = True: Input should be a valid number"),
        ({"train.device": "tpu"}, "train.device = 'tpu': Input should be 'auto', 'cpu' or"),
        ({"train.colour": 1}, "unknown key 'train.colour'"),
        ({"surprise": 1}, "unknown key 'surprise'"),
        ({"data.source": "s3://bucket"}, "data.source = 's3://bucket': Value error, must be"),
        ({"transfer.frozen_epochs": 9}, "frozen_epochs (9) cannot exceed epochs (4)"),
        ({"tracking.registered_model": "it's"}, 'tracking.registered_model = "it\'s"'),
        (
            {"train.privacy.epsilon": 0.001},
            "train.privacy.epsilon = 0.001: Value error, must be 0 (not private) or a budget",
        ),
        ({"transfer.privacy.epsilon": -1.5}, "transfer.privacy.epsilon = -1.5: Value error, must"),
        ({"train.privacy.epsilon": None}, "train.privacy.epsilon = None: Value error, must be 0"),
        ({"train.privacy.delta": 1}, "train.privacy.delta = 1: Value error, must be auto or a"),
        ({"train.privacy.delta": 0}, "train.privacy.delta = 0: Value error, must be auto or a"),
        (
            {"train.privacy.epsilon": 8, "train.nproc": 2},
            "train: train.privacy.epsilon is set with train.nproc = 2: private training runs in "
            "one process (set train.nproc: 1)",
        ),
    ],
)
def test_bad_params_name_key_value_and_what_is_allowed(tmp_path, overrides, expected):
    write_params(tmp_path, overrides)
    with pytest.raises(UserError) as caught:
        load_params(tmp_path / "params.yaml")
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_a_model_without_a_private_recipe_cannot_train_privately(tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "plain_cnn", models.ModelSpec("train", "cnnpipe:seed_cnn"))
    write_params(tmp_path, {"train.model": "plain_cnn", "train.privacy.epsilon": 8})
    with pytest.raises(UserError) as caught:
        load_params(tmp_path / "params.yaml")
    assert str(caught.value).endswith(
        "train: train.model plain_cnn cannot train privately: choose one of seed_cnn, "
        "small_cnn, or set train.privacy.epsilon: 0"
    )
    write_params(tmp_path, {"train.model": "plain_cnn"})
    assert load_params(tmp_path / "params.yaml").train.model == "plain_cnn"


def test_a_missing_section_or_key_is_named(tmp_path):
    partial = {k: v for k, v in PARAMS.items() if k != "augment"}
    partial["train"] = {k: v for k, v in PARAMS["train"].items() if k != "lr"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(partial))
    with pytest.raises(UserError) as caught:
        load_params(tmp_path / "params.yaml")
    assert "'augment' is missing" in str(caught.value)
    assert "'train.lr' is missing" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "must be a mapping of sections"),
        (b"seed: 1\nseed: 2\n", "key 'seed' appears twice"),
        (b"train:\n  lr: 1\n  lr: 2\n", "key 'lr' appears twice"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
        (b"seed: [1,\n", "is not valid YAML"),
    ],
)
def test_a_broken_params_file_is_one_line(tmp_path, content, expected):
    (tmp_path / "params.yaml").write_bytes(content)
    with pytest.raises(UserError, match=expected) as caught:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(caught.value)


def test_a_directory_or_no_file_is_one_line(tmp_path):
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(UserError, match="not found: run cnnpipe from the repository root"):
        load_params(tmp_path / "other.yaml")


def test_exponent_notation_is_a_number(tmp_path):
    """`dvc exp run -S train.lr=1e-3` writes YAML 1.2's float, which PyYAML reads as text."""
    text = (REPO / "params.yaml").read_text().replace("lr: 0.003 ", "lr: 1e-3 ", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.lr == 0.001


def test_stage_params_use_shared_names_for_both_models():
    params = load_params(REPO / "params.yaml")
    train, transfer = (layout.stage_params(s, params) for s in ("train", "transfer"))
    for shared in ("model", "epochs", "batch_size", "lr", "seed", "privacy.epsilon"):
        assert shared in train and shared in transfer, shared
    assert train["model"] == "small_cnn" and transfer["model"] == "efficientnet_lite0"
    assert transfer["frozen_epochs"] == 1 and "frozen_epochs" not in train


def with_preset(name: str) -> Params:
    merged = PARAMS | {}
    for key, value in preset(name, REPO / "presets").items():
        section, field = key.split(".")
        merged[section] = merged[section] | {field: value}
    return Params.model_validate(merged)


def test_the_tiny_preset_is_valid_params():
    tiny = preset("tiny", REPO / "presets")
    assert tiny["train.model"] == "seed_cnn" and tiny["data.image_size"] == 16
    assert with_preset("tiny").transfer.epochs == tiny["transfer.epochs"]


def test_the_classic_preset_switches_every_recipe_option_off():
    """The recipe before its options, for bench/real_images.py: a new option of the train or
    transfer sections must be given its off value there."""
    classic = with_preset("classic")
    for section in (classic.train, classic.transfer):
        assert section.label_smoothing == section.mixup == section.cutmix == 0
        assert section.ema_decay == section.patience == section.warmup_epochs == 0
        assert (section.class_weights, section.precision) == ("none", "fp32")
    listed = set(preset("classic", REPO / "presets"))
    for section in ("train", "transfer"):
        options = set(PARAMS[section]) - {"device", "deterministic", "nproc", "privacy"}
        assert {f"{section}.{key}" for key in options} <= listed, section
    assert not classic.augment.on_the_fly and classic.data.image_size == 32


def test_cli_reports_bad_params_in_one_line_without_traceback(tmp_path):
    write_params(tmp_path, {"data.image_size": 4})
    result = subprocess.run(
        [sys.executable, "-m", "cnnpipe", "prepare"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "data.image_size = 4" in lines[0] and "auto or a whole number from 8 to 512" in lines[0]
    assert not (tmp_path / "data").exists()


def test_dvc_exp_run_set_changes_only_the_line_it_sets(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through DVC's own YAML writer, which writes a
    `null` as nothing at all: params.yaml has no null, so every other line comes back as is."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, ["train.lr=0.01", "transfer.privacy.epsilon=8"])
    before, after = (REPO / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert [new.split("#")[0].split() for _, new in changed] == [["lr:", "0.01"], ["epsilon:", "8"]]
    assert load_params(path).transfer.privacy.enabled
