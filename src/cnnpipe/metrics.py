"""Numbers about a trained model on labelled images: quality, calibration, cost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm

from cnnpipe import engine

CALIBRATION_BINS = 10


def score(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, ROC-AUC (one-vs-rest for several classes), expected calibration
    error, and per-class precision and recall."""
    predicted = probabilities.argmax(axis=1)
    everyone = list(range(len(classes)))
    precision, recall, _, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=everyone, zero_division=0
    )
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "macro_f1": skm.f1_score(
            labels, predicted, average="macro", labels=everyone, zero_division=0
        ),
        "roc_auc": roc_auc(labels, probabilities),
        "ece": expected_calibration_error(labels, probabilities),
        "precision": dict(zip(classes, precision.tolist(), strict=True)),
        "recall": dict(zip(classes, recall.tolist(), strict=True)),
        "support": dict(zip(classes, support.tolist(), strict=True)),
    }


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """ROC-AUC (one-vs-rest, macro, for several classes); None where it is undefined: a class
    with no test image has no positives to rank."""
    classes = probabilities.shape[1]
    if len(np.unique(labels)) < classes:
        return None
    if classes == 2:
        return float(skm.roc_auc_score(labels, probabilities[:, 1]))
    return float(
        skm.roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(classes)))
    )


def confusion(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Counts with rows = actual class, columns = predicted class (scikit-learn's order)."""
    everyone = list(range(probabilities.shape[1]))
    return skm.confusion_matrix(labels, probabilities.argmax(1), labels=everyone)


def reliability(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Per confidence bin: mean confidence, accuracy and count (equal-width bins)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    count = np.bincount(bins, minlength=CALIBRATION_BINS)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(bins, confidence, CALIBRATION_BINS) / count
        accuracy = np.bincount(bins, correct, CALIBRATION_BINS) / count
    return {"confidence": mean_confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean |accuracy - confidence| over confidence bins, weighted by how many images each
    bin holds: 0 for a perfectly calibrated model."""
    bins = reliability(labels, probabilities)
    gaps = np.nan_to_num(np.abs(bins["accuracy"] - bins["confidence"]))
    return float((gaps * bins["count"]).sum() / bins["count"].sum())


def latency(
    model: torch.nn.Module,
    images: np.ndarray,
    norm: engine.Normalisation,
    device: torch.device,
    repeats: int = 20,
) -> dict[str, float]:
    """`latency_ms`: the median wall time of predicting one image (batch of 1) on `device`,
    after a warm-up; `latency_load_average`: the machine's 1-minute load average as it was
    timed, which says how far a busy machine may have slowed it."""
    one = images[:1].copy()
    engine.predict_logits(model, one, norm, device)  # warm-up
    load_average = os.getloadavg()[0]
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.predict_logits(model, one, norm, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return {"latency_ms": float(np.median(timings) * 1000), "latency_load_average": load_average}


def size(model: torch.nn.Module, weights_file: Path) -> dict[str, float]:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "file_mb": weights_file.stat().st_size / 2**20,
    }


def curves(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """ROC and precision-recall curves, one per class (one for the positive class if two)."""
    shown = [1] if len(classes) == 2 else range(len(classes))
    out = {}
    for k in shown:
        positive = labels == k
        fpr, tpr, _ = skm.roc_curve(positive, probabilities[:, k])
        precision, recall, _ = skm.precision_recall_curve(positive, probabilities[:, k])
        out[classes[k]] = {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}
    return out
