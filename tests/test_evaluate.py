import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cnnpipe import layout, metrics, networks, report
from cnnpipe.errors import UserError
from cnnpipe.report import ModelResult
from cnnpipe.stages.evaluate import LoadedModel, choose, require_memory
from cnnpipe.store import ModelMeta, PrivacySpent


def test_score_of_a_known_prediction():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.1, 0.8],
            [0.3, 0.3, 0.4],
        ]
    )
    scores = metrics.score(labels, probabilities, ["a", "b", "c"])
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["precision"] == {"a": 1.0, "b": pytest.approx(2 / 3), "c": 1.0}
    assert scores["recall"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert scores["support"] == {"a": 2, "b": 2, "c": 2}
    # one-vs-rest by hand: a ranks 7 of its 8 positive-negative pairs right, b and c all
    assert scores["roc_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)


def test_binary_scores_use_the_positive_class_probability():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    scores = metrics.score(labels, probabilities, ["no", "yes"])
    assert scores["roc_auc"] == 1.0
    assert scores["accuracy"] == 0.75


def test_expected_calibration_error():
    labels = np.array([0, 0, 0, 0])
    confident_right = np.array([[1.0, 0.0]] * 4)
    assert metrics.expected_calibration_error(labels, confident_right) == 0
    # confidence 0.75 everywhere, right half of the time: |0.5 - 0.75| = 0.25
    probabilities = np.array([[0.75, 0.25], [0.25, 0.75], [0.75, 0.25], [0.25, 0.75]])
    assert metrics.expected_calibration_error(labels, probabilities) == pytest.approx(0.25)


def _result(name, accuracy, parameters):
    return ModelResult(name, name, {"accuracy": accuracy}, {"parameters": parameters})


def test_choose_the_best_by_metric_and_the_smaller_model_on_a_tie():
    assert choose([_result("a", 0.9, 10), _result("b", 0.95, 99)], "accuracy").name == "b"
    assert choose([_result("a", 0.95, 10), _result("b", 0.95, 99)], "accuracy").name == "a"


def test_a_score_undefined_on_the_test_split_is_none_and_never_wins():
    labels = np.array([0, 0, 1, 1])  # class 2 has no test image: no ROC-AUC
    probabilities = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    scores = metrics.score(labels, probabilities, ["a", "b", "c"]) | {"audit_auc": 0.5}
    assert scores["roc_auc"] is None and scores["accuracy"] == 1.0
    undefined = ModelResult(
        "a",
        "a",
        scores,
        {"parameters": 1, "latency_ms": 1, "latency_load_average": 1, "file_mb": 1},
    )
    defined = ModelResult("b", "b", scores | {"roc_auc": 0.1}, {"parameters": 99})
    assert choose([undefined, defined], "roc_auc").name == "b"
    assert "roc_auc" in undefined.headline() and "test_roc_auc" not in undefined.test_metrics()
    text = report.render([undefined], undefined, "roc_auc", "Test split: 4.", "cpu")
    assert "| ROC-AUC | n/a |" in text and "nan" not in text.lower()


def test_the_report_shows_each_models_epsilon_beside_its_audit_and_tags_carry_it():
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    scores = metrics.score(np.array([0, 1, 1, 0]), probabilities, ["no", "yes"])
    scores["audit_auc"] = 0.512
    costs = {"parameters": 1, "latency_ms": 1, "latency_load_average": 1, "file_mb": 1}
    private = ModelResult(
        "scratch", "seed_cnn", scores, costs, PrivacySpent(epsilon=7.98, delta=8.6e-5)
    )
    plain = ModelResult("transfer", "efficientnet_lite0", scores | {"audit_auc": 0.6}, costs)
    text = report.render([private, plain], private, "accuracy", "Test split: 4.", "cpu")
    assert "| membership-inference audit AUC | 0.512 | 0.600 |" in text
    assert "| privacy budget | ε = 7.98 (δ = 8.6e-05) | not private |" in text
    assert report.metrics_file([private, plain])["epsilon"] == {"scratch": 7.98, "transfer": None}
    assert report.metrics_file([private, plain])["audit_auc"] == {"scratch": 0.512, "transfer": 0.6}
    assert private.test_metrics()["test_audit_auc"] == 0.512
    assert private.privacy_tags() == {"epsilon": "7.98", "delta": "8.6e-05"}
    assert plain.privacy_tags() == {"epsilon": "not private"}


def test_a_batch_too_large_for_memory_is_refused_in_one_line_before_evaluating():
    """A transfer model at 512 px takes about 70 MiB an image in a forward pass: 20,000 real
    digits in one batch need over a terabyte, more than any machine this runs on has, and are
    refused naming evaluate.batch_size; batches of 8 are not."""
    digits = load_digits()
    images = np.repeat((digits.images * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
    images = np.resize(images, (20_000, 8, 8, 3))
    network = networks.build("efficientnet_lite0", num_classes=10, image_size=8, input_size=512)
    mean_std = networks.normalisation("efficientnet_lite0")
    meta = ModelMeta(
        architecture="efficientnet_lite0",
        classes=[str(digit) for digit in range(10)],
        image_size=8,
        input_size=512,
        mean=mean_std[0],
        std=mean_std[1],
        best_epoch=1,
    )
    model = LoadedModel(layout.TRANSFER, network.eval(), meta)
    cpu = torch.device("cpu")
    with pytest.raises(UserError) as refused:
        require_memory(model, images, 65536, cpu)
    message = str(refused.value)
    assert "the transfer model in batches of 20,000 images at 512 px" in message, message
    assert "lower evaluate.batch_size well below" in message
    require_memory(model, images, 8, cpu)
