"""Reading run records generically: each experiment's main metric, grouping by tags and learning rate."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from harness import load_records

__all__ = [
    "MAIN_METRICS", "main_metric", "metric_value", "facet_key", "facet_sort_key", "facet_title", "lr_points",
    "LrPoint", "records_of",
]  # fmt: skip

# experiment -> (candidate final-metric names in order of preference, higher is better). A record uses the first
# name it has (GLUE's metric depends on the task: accuracy, Matthews correlation for CoLA, Pearson for STS-B).
MAIN_METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt2_e2e": (("BLEU", "bleu"), True),
    "glue": (("accuracy", "eval_accuracy", "matthews_correlation", "pearson", "spearmanr", "f1", "acc"), True),
    "theory": (("relative_loss",), False),
}
_LOWER_IS_BETTER_HINTS = ("loss", "error", "fid", "perplexity", "ppl", "time")


def records_of(results_dir: str | Path, experiment: str) -> list:
    """The experiment's records, or ``[]`` when the results folder or the experiment's folder does not exist."""
    try:
        return load_records(results_dir, experiment=experiment)
    except FileNotFoundError:
        return []


def main_metric(experiment: str, record) -> tuple[str, bool] | None:
    """(name, higher_is_better) of the record's main final metric, or ``None`` when it has none (e.g. a loss-curve
    run that was not scored). Experiments outside :data:`MAIN_METRICS` use their first numeric final metric."""
    if experiment in MAIN_METRICS:
        names, higher = MAIN_METRICS[experiment]
        return next(((name, higher) for name in names if name in record.final_metrics), None)
    for name, value in record.final_metrics.items():  # unknown experiment: its first numeric final metric
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, not any(h in name.lower() for h in _LOWER_IS_BETTER_HINTS)
    return None


def metric_value(record, name: str) -> float:
    """A final metric as a float (``nan`` when missing or null, or when the run is flagged ``diverged``)."""
    if record.final_metrics.get("diverged") is True:
        return float("nan")
    value = record.final_metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def facet_key(record) -> tuple:
    """Records that are comparable across learning rates share their tags (preset, task, kappa, ...)."""
    return tuple(sorted((str(k), _fmt(v)) for k, v in record.tags.items()))


def facet_sort_key(key: tuple) -> tuple:
    """Sort facets by tag, numbers numerically."""
    out = []
    for name, value in key:
        try:
            out.append((name, 0, float(value), ""))
        except ValueError:
            out.append((name, 1, 0.0, value))
    return tuple(out)


def facet_title(key: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in key) or "all runs"


@dataclass
class LrPoint:
    lr: float
    mean: float  # over the finite values of the seeds (nan: every seed diverged)
    low: float
    high: float
    runs: int
    diverged: int  # runs whose metric is missing or non-finite


def lr_points(records: Iterable, metric: str) -> list[LrPoint]:
    """One point per learning rate: mean (and min / max) of ``metric`` over the runs (seeds) at that rate."""
    by_lr = defaultdict(list)
    for rec in records:
        if "lr" not in rec.hparams:
            raise ValueError(f"record '{rec.run_name}' has no 'lr' hyperparameter (hparams: {sorted(rec.hparams)})")
        by_lr[float(rec.hparams["lr"])].append(metric_value(rec, metric))
    points = []
    for lr in sorted(by_lr):
        values = by_lr[lr]
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            points.append(LrPoint(lr, statistics.fmean(finite), min(finite), max(finite), len(values),
                                  len(values) - len(finite)))  # fmt: skip
        else:
            points.append(LrPoint(lr, float("nan"), float("nan"), float("nan"), len(values), len(values)))
    return points
