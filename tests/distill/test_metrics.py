"""bert_emd.distill.metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from bert_emd.distill.metrics import (  # noqa: E402
    accuracy,
    binary_f1,
    compute_metrics_fn,
    logits_to_predictions,
    macro_f1,
    main_metric,
    matthews,
    pearson,
    spearman,
    task_metrics,
)

# preds vs labels: TP = 3 (0, 3, 5), TN = 1 (1), FP = 1 (2), FN = 1 (4)
P = [1, 0, 1, 1, 0, 1]
Y = [1, 0, 0, 1, 1, 1]


def test_binary_by_hand():
    assert accuracy(P, Y) == pytest.approx(4 / 6)
    # precision 3/4, recall 3/4
    assert binary_f1(P, Y) == pytest.approx(0.75)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(4*4*2*2)
    assert matthews(P, Y) == pytest.approx(0.25)


def test_macro_f1_by_hand():
    # class 0: F1 1; class 1: P 1, R 1/2 -> 2/3; class 2: P 1/2, R 1 -> 2/3
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_correlations_by_hand():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): r = 11 / sqrt(5 * 26)
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(130))
    assert spearman(x, y) == pytest.approx(1.0)
    # ranks (1,2,3,4) vs (4,3,1,2): sum d^2 = 18, rho = 1 - 6*18 / (4*15)
    assert spearman(x, [4, 3, 1, 2]) == pytest.approx(-0.8)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # undefined, not a crash


def test_task_metrics_per_glue_task():
    m = task_metrics("MRPC", P, Y)
    assert list(m) == ["f1", "acc", "acc_and_f1"]
    assert m["acc_and_f1"] == pytest.approx((0.75 + 4 / 6) / 2)
    assert task_metrics("cola", P, Y) == {"mcc": pytest.approx(0.25)}
    assert task_metrics("sst-2", P, Y) == {"acc": pytest.approx(4 / 6)}
    assert list(task_metrics("qqp", P, Y)) == ["f1", "acc", "acc_and_f1"]
    for task in ("mnli", "qnli", "rte", "wnli"):
        assert list(task_metrics(task, P, Y)) == ["acc"]
    s = task_metrics("sts-b", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert s["corr"] == pytest.approx((11 / math.sqrt(130) + 1.0) / 2)
    custom = task_metrics(None, [0, 1, 2, 2], [0, 1, 1, 2])
    assert list(custom) == ["acc", "macro_f1", "mcc"] and custom["acc"] == pytest.approx(0.75)
    assert main_metric("cola") == "mcc" and main_metric(None, is_regression=True) == "pearson"


def test_compute_metrics_fn_from_logits():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5], [1.0, 0.0]])
    fn = compute_metrics_fn("sst-2", False)
    assert fn(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0, 0]))) == {"acc": pytest.approx(0.75)}
    reg = compute_metrics_fn("sts-b", True)
    out = reg(EvalPrediction(predictions=np.array([[1.0], [2.0], [3.0], [4.0]]), label_ids=np.array([2, 4, 5, 9.0])))
    assert out["pearson"] == pytest.approx(11 / math.sqrt(130))
    assert list(logits_to_predictions((logits,), False)) == [1, 0, 1, 0]


def test_metric_errors():
    with pytest.raises(ValueError, match=r"predictions \(2\) and labels \(3\) differ"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="empty evaluation set"):
        accuracy([], [])
    with pytest.raises(ValueError, match=r"must be \[n, C\]"):
        logits_to_predictions(np.zeros(3), False)
