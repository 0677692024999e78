"""GLUE metrics computed locally with scikit-learn / scipy (nothing is downloaded at run time).

Each task reports the metrics GLUE defines for it:

    cola              matthews_correlation
    stsb              pearson, spearmanr (predictions are real-valued scores)
    mrpc, qqp         accuracy, f1 (positive class = 1, "paraphrase" / "duplicate")
    mnli, qnli, rte,
    sst2, wnli        accuracy

`primary_metric(task)` names the single number that goes into Table 2 (the one the authors' script used as
`metric_for_best_model`: Matthews for CoLA, Pearson for STS-B, accuracy otherwise).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")

_PRIMARY = {"cola": "matthews_correlation", "stsb": "pearson"}


def check_task(task: str) -> str:
    """Return `task` if it is a GLUE task name, else raise a ValueError that lists the known ones."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_TASKS)}")
    return task


def primary_metric(task: str) -> str:
    """The metric reported for `task` in Table 2."""
    return _PRIMARY.get(check_task(task), "accuracy")


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """GLUE metrics of `predictions` against `labels`.

    predictions: class ids (or, for stsb, real-valued scores), shape (N,); labels: same shape.
    """
    check_task(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {predictions.shape} != labels shape {labels.shape}")
    if predictions.size == 0:
        raise ValueError(f"no predictions to score for task {task!r}")
    if task == "stsb":
        return {"pearson": float(pearsonr(predictions, labels)[0]),
                "spearmanr": float(spearmanr(predictions, labels)[0])}
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if task in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, predictions))
    return out


def logits_to_predictions(task: str, logits) -> np.ndarray:
    """Classifier outputs (N, num_labels) -> class ids, or (N, 1) -> scores for the regression task stsb."""
    logits = np.asarray(logits)
    if task == "stsb":
        return logits.reshape(len(logits), -1)[:, 0]
    return logits.argmax(axis=-1)


def compute_metrics_fn(task: str):
    """A `compute_metrics` callable for transformers' Trainer (takes an EvalPrediction)."""
    check_task(task)

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        if isinstance(logits, tuple):  # some models also return hidden states
            logits = logits[0]
        return glue_metrics(task, logits_to_predictions(task, logits), labels)

    return compute_metrics
