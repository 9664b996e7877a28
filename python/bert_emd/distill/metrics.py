"""Evaluation metrics of the GLUE tasks, computed locally with scikit-learn and scipy.

Nothing is fetched: the formulas are the ones of the GLUE benchmark (and of Hugging Face's
``glue`` metric), computed from numpy arrays.

=========  ==========================================================
task       metrics (the first is the task's main metric)
=========  ==========================================================
cola       mcc (Matthews correlation)
sst-2      acc
mrpc       f1, acc, acc_and_f1        (F1 of the positive class 1)
sts-b      pearson, spearmanr, corr   (corr = mean of the two)
qqp        f1, acc, acc_and_f1
mnli       acc                        (matched and mismatched dev sets)
qnli       acc
rte        acc
wnli       acc
(other)    classification: acc, macro_f1, mcc; regression: pearson, spearmanr, corr
=========  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "GLUE_METRICS",
    "accuracy",
    "binary_f1",
    "compute_metrics_fn",
    "logits_to_predictions",
    "macro_f1",
    "main_metric",
    "matthews",
    "pearson",
    "spearman",
    "task_metrics",
]

# Main metric first.
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst-2": ("acc",),
    "mrpc": ("f1", "acc", "acc_and_f1"),
    "sts-b": ("pearson", "spearmanr", "corr"),
    "qqp": ("f1", "acc", "acc_and_f1"),
    "mnli": ("acc",),
    "qnli": ("acc",),
    "rte": ("acc",),
    "wnli": ("acc",),
}
_CLASSIFICATION = ("acc", "macro_f1", "mcc")
_REGRESSION = ("pearson", "spearmanr", "corr")


def _arrays(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.shape[0]}) and labels ({y.shape[0]}) differ in length")
    if p.size == 0:
        raise ValueError("no predictions to score (empty evaluation set)")
    return p, y


def accuracy(preds: Any, labels: Any) -> float:
    """Share of predictions equal to the labels. preds, labels: [n] class indices."""
    p, y = _arrays(preds, labels)
    return float((p == y).mean())


def binary_f1(preds: Any, labels: Any) -> float:
    """F1 of the positive class (label 1), as GLUE's MRPC and QQP. preds, labels: [n] in {0, 1}."""
    from sklearn.metrics import f1_score

    p, y = _arrays(preds, labels)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def macro_f1(preds: Any, labels: Any) -> float:
    """Unweighted mean of the per-class F1 scores over the classes present in preds or labels."""
    from sklearn.metrics import f1_score

    p, y = _arrays(preds, labels)
    return float(f1_score(y, p, average="macro", zero_division=0.0))


def matthews(preds: Any, labels: Any) -> float:
    """Matthews correlation coefficient (CoLA's metric); 0 when it is undefined (one class only)."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _arrays(preds, labels)
    return float(matthews_corrcoef(y, p))


def _constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def pearson(preds: Any, labels: Any) -> float:
    """Pearson correlation of two [n] float arrays; NaN when either is constant (undefined)."""
    from scipy.stats import pearsonr

    p, y = _arrays(preds, labels)
    if p.size < 2 or _constant(p) or _constant(y):
        return float("nan")
    return float(pearsonr(p.astype(np.float64), y.astype(np.float64))[0])


def spearman(preds: Any, labels: Any) -> float:
    """Spearman rank correlation of two [n] float arrays; NaN when either is constant."""
    from scipy.stats import spearmanr

    p, y = _arrays(preds, labels)
    if p.size < 2 or _constant(p) or _constant(y):
        return float("nan")
    return float(spearmanr(p.astype(np.float64), y.astype(np.float64))[0])


def _names(task: str | None, is_regression: bool) -> tuple[str, ...]:
    key = (task or "").lower()
    if key in GLUE_METRICS:
        return GLUE_METRICS[key]
    return _REGRESSION if is_regression else _CLASSIFICATION


def main_metric(task: str | None, is_regression: bool = False) -> str:
    """Name of the task's headline metric (``mcc`` for CoLA, ``acc`` for SST-2, ...)."""
    return _names(task, is_regression)[0]


def task_metrics(task: str | None, preds: Any, labels: Any, *, is_regression: bool = False) -> dict[str, float]:
    """The metrics of ``task`` (a GLUE task name, or None / any other name for a custom data set).

    Args:
        task: ``"cola"``, ``"sst-2"``, ..., or None.
        preds: [n] predicted class indices (or [n] floats for regression).
        labels: [n] gold labels.
        is_regression: for a non-GLUE task, score as regression (Pearson / Spearman).
    Returns:
        ``{name: value}`` in the order of :data:`GLUE_METRICS` (main metric first).
    """
    key = (task or "").lower()
    if key in GLUE_METRICS:
        is_regression = key == "sts-b"
    out: dict[str, float] = {}
    for name in _names(task, is_regression):
        if name in _AVERAGES:  # listed after the two metrics they average
            first, second = _AVERAGES[name]
            out[name] = (out[first] + out[second]) / 2.0
        else:
            out[name] = _METRICS[name](preds, labels)
    return out


_METRICS = {"acc": accuracy, "f1": binary_f1, "macro_f1": macro_f1, "mcc": matthews, "pearson": pearson,
            "spearmanr": spearman}
_AVERAGES = {"acc_and_f1": ("acc", "f1"), "corr": ("pearson", "spearmanr")}


def logits_to_predictions(logits: Any, is_regression: bool) -> np.ndarray:
    """[n, C] logits -> [n] argmax classes; regression [n] / [n, 1] -> [n] floats."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    x = np.asarray(logits)
    if is_regression:
        return x.reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"classification logits must be [n, C], got shape {x.shape}")
    return x.argmax(-1)


def compute_metrics_fn(task: str | None, is_regression: bool) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` callable for ``transformers.Trainer`` (takes an ``EvalPrediction``)."""

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        preds = logits_to_predictions(logits, is_regression)
        return task_metrics(task, preds, labels, is_regression=is_regression)

    return compute
