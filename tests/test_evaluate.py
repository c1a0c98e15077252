import numpy as np
import pytest

from cnnpipe.stages.evaluate import comparison_table, score


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
    scores = score(labels, probabilities, ["a", "b", "c"])
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["precision"] == {"a": 1.0, "b": pytest.approx(2 / 3), "c": 1.0}
    assert scores["recall"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert 0.5 < scores["roc_auc"] <= 1


def test_binary_scores_use_the_positive_class_probability():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    scores = score(labels, probabilities, ["no", "yes"])
    assert scores["roc_auc"] == 1.0
    assert scores["accuracy"] == 0.75


def test_comparison_table_puts_models_side_by_side():
    table = comparison_table(
        {
            "scratch": {"accuracy": 0.99, "macro_f1": 0.98, "roc_auc": 1.0},
            "transfer": {"accuracy": 0.95, "macro_f1": 0.94, "roc_auc": 0.99},
        }
    )
    assert "| accuracy | 0.9900 | 0.9500 |" in table
