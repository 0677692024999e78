"""Mistral-7B/glue_metrics.py against values computed by hand."""
import math

import numpy as np
import pytest

from harness import load_module

glue = load_module("Mistral-7B/glue_metrics.py")
compute_metrics_fn, glue_metrics, logits_to_predictions, primary_metric = (
    glue.compute_metrics_fn, glue.glue_metrics, glue.logits_to_predictions, glue.primary_metric)


def test_cola_matthews():
    # TP=1 FP=1 TN=2 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2) = 2 / sqrt(12)
    out = glue_metrics("cola", [1, 1, 0, 0], [1, 0, 0, 0])
    assert out == pytest.approx({"matthews_correlation": 2 / math.sqrt(12)})


def test_mrpc_and_qqp_accuracy_and_f1():
    # 3 of 5 right; TP=2 FP=1 FN=1 -> F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    for task in ("mrpc", "qqp"):
        out = glue_metrics(task, [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
        assert out == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})


def test_stsb_pearson_and_spearman():
    # x = [1,2,3], y = [1,2,4]: cov = 3, |dx| = sqrt(2), |dy| = sqrt(42/9) -> r = 9 / sqrt(84)
    assert glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(
        {"pearson": 9 / math.sqrt(84), "spearmanr": 1.0})
    # rank differences d = (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert glue_metrics("stsb", [1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0])["spearmanr"] == pytest.approx(0.8)


@pytest.mark.parametrize("task", ["sst2", "rte", "qnli", "wnli", "mnli"])
def test_accuracy_tasks(task):
    assert glue_metrics(task, [0, 1, 2, 1], [0, 1, 1, 1]) == pytest.approx({"accuracy": 0.75})


def test_primary_metric():
    assert primary_metric("cola") == "matthews_correlation"
    assert primary_metric("stsb") == "pearson"
    assert primary_metric("mrpc") == "accuracy"


def test_predictions_from_logits_and_trainer_hook():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert logits_to_predictions("sst2", logits).tolist() == [1, 0, 1]
    assert logits_to_predictions("stsb", np.array([[0.5], [4.0]])).tolist() == [0.5, 4.0]
    assert compute_metrics_fn("sst2")((logits, np.array([1, 1, 1]))) == pytest.approx({"accuracy": 2 / 3})


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown GLUE task 'glue'"):
        glue_metrics("glue", [1], [1])
    with pytest.raises(ValueError, match=r"shape \(2,\) != labels shape \(3,\)"):
        glue_metrics("sst2", [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        glue_metrics("sst2", [], [])
