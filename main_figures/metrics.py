"""Reading run records generically: each experiment's main metric, a run's outcome, grouping by tags and learning
rate, and the one learning-rate robustness metric that every table and figure reports (:func:`lr_robustness`)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from harness import load_records
from harness.records import RUN_STATUSES

__all__ = [
    "MAIN_METRICS", "main_metric", "metric_value", "facet_key", "facet_sort_key", "facet_title", "lr_points",
    "LrPoint", "records_of", "run_outcome", "outcome_label", "counts_as_result", "TOLERANCES", "Tolerance",
    "tolerance_for", "lr_robustness", "Robustness", "OptimizerRobustness", "format_width", "GRID_NOTE",
    "robustness_verdict",
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
    """The experiment's records, or ``[]`` when the results folder or the experiment's folder does not exist. A file
    that is not valid JSON or not a run record is skipped with a warning naming it (``InvalidRecordWarning``)."""
    try:
        return load_records(results_dir, experiment=experiment, on_invalid="warn")
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


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def run_outcome(record) -> str:
    """How the run ended: ``"done"``, ``"diverged"``, ``"failed"``, ``"running"`` or ``"interrupted"``.

    The record's top-level ``status`` when it has one. Records written before that field existed are read by their
    markers: ``diverged: true`` or a ``diverged_at_step`` in the final metrics (the training loops' marks when they
    stop a run on a non-finite loss or gradient), or a main metric that is present but null / non-finite (the
    recorder stores NaN and inf as null), mean ``"diverged"``; otherwise ``"done"``.
    """
    status = getattr(record, "status", None)
    if status is not None:
        if status not in RUN_STATUSES:
            raise ValueError(f"record '{record.run_name}': status {status!r}, expected one of {RUN_STATUSES}")
        return status
    metrics = record.final_metrics
    if metrics.get("diverged") is True or metrics.get("diverged_at_step") is not None:
        return "diverged"
    main = main_metric(record.experiment, record)
    if main is not None and not math.isfinite(_number(metrics.get(main[0]))):
        return "diverged"
    return "done"


def counts_as_result(record) -> bool:
    """Whether the run is over (done, diverged or failed); running and interrupted runs are left out of every
    value (the tables say so)."""
    return run_outcome(record) in ("done", "diverged", "failed")


def outcome_label(record) -> str:
    """What a table cell shows instead of a value for a run that is not ``done``: ``diverged@<step>`` (or
    ``diverged``), ``failed``, ``running``, ``interrupted``."""
    outcome = run_outcome(record)
    if outcome == "diverged":
        step = record.final_metrics.get("diverged_at_step")
        return f"diverged@{step}" if step is not None else "diverged"
    return outcome


def metric_value(record, name: str) -> float:
    """A final metric as a float; ``nan`` when missing or null, or when the run is not ``done`` (diverged and
    failed runs never count as values, even when they were scored after stopping)."""
    if run_outcome(record) != "done":
        return float("nan")
    return _number(record.final_metrics.get(name))


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
    mean: float  # over the finite values of the seeds that are done (nan: none)
    low: float
    high: float
    runs: int  # runs that are over: done, diverged or failed
    diverged: int  # of those, runs that diverged or failed or have no finite metric (never counted as values)
    failed: int = 0  # of the diverged ones, runs that failed
    left_out: int = 0  # running / interrupted runs at this rate (in no value)

    @property
    def clean(self) -> bool:
        """Every run at this rate is done with a finite value (only such rates count for the robustness)."""
        return self.runs > 0 and self.diverged == 0 and math.isfinite(self.mean)


def lr_points(records: Iterable, metric: str) -> list[LrPoint]:
    """One point per learning rate: mean (and min / max) of ``metric`` over the runs (seeds) at that rate that are
    done; diverged and failed runs are counted, running and interrupted ones left out (see :func:`run_outcome`)."""
    by_lr = defaultdict(list)
    for rec in records:
        if "lr" not in rec.hparams:
            raise ValueError(f"record '{rec.run_name}' has no 'lr' hyperparameter (hparams: {sorted(rec.hparams)})")
        by_lr[float(rec.hparams["lr"])].append(rec)
    points = []
    for lr in sorted(by_lr):
        outcomes = [run_outcome(r) for r in by_lr[lr]]
        over = [r for r, o in zip(by_lr[lr], outcomes) if o in ("done", "diverged", "failed")]
        values = [metric_value(r, metric) for r in over]
        finite = [v for v in values if math.isfinite(v)]
        stats = (statistics.fmean(finite), min(finite), max(finite)) if finite else (float("nan"),) * 3
        points.append(LrPoint(lr, *stats, runs=len(over), diverged=len(over) - len(finite),
                              failed=outcomes.count("failed"), left_out=len(outcomes) - len(over)))  # fmt: skip
    return points


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate robustness: the best value, and the width in decades of the learning-rate interval over which an
# optimizer stays within a stated tolerance of its own best.


@dataclass(frozen=True)
class Tolerance:
    """How close to its own best a value must be: ``absolute`` (within ``value`` of the best, in the metric's own
    units) or ``factor`` (within a factor ``value``: at most best x value when lower is better)."""

    value: float
    kind: str  # "absolute" | "factor"
    text: str  # for the tables, e.g. "0.02 BLEU"

    def within(self, value: float, best: float, higher: bool) -> bool:
        if not (math.isfinite(value) and math.isfinite(best)):
            return False
        if self.kind == "absolute":
            return value >= best - self.value - 1e-12 if higher else value <= best + self.value + 1e-12
        if self.kind == "factor":
            if best <= 0 or value <= 0:
                return value == best
            ratio = best / value if higher else value / best
            return ratio <= self.value * (1 + 1e-12)
        raise ValueError(f"tolerance kind {self.kind!r}, expected 'absolute' or 'factor'")


_POINT = Tolerance(0.01, "absolute", "1 point (0.01)")  # GLUE metrics are fractions; tables show them x 100
# (experiment, metric) -> tolerance. The E2E and GLUE ones are about the run-to-run noise of the small presets;
# the theory's relative loss spans many decades, so there it is a factor.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("gpt2_e2e", "BLEU"): Tolerance(0.02, "absolute", "0.02 BLEU"),
    ("gpt2_e2e", "bleu"): Tolerance(0.02, "absolute", "0.02 BLEU"),
    ("glue", "accuracy"): Tolerance(0.01, "absolute", "1 accuracy point (0.01)"),
    ("glue", "eval_accuracy"): Tolerance(0.01, "absolute", "1 accuracy point (0.01)"),
    ("glue", "acc"): Tolerance(0.01, "absolute", "1 accuracy point (0.01)"),
    ("glue", "matthews_correlation"): _POINT,
    ("glue", "pearson"): _POINT,
    ("glue", "spearmanr"): _POINT,
    ("glue", "f1"): _POINT,
    ("theory", "relative_loss"): Tolerance(10.0, "factor", "a factor 10 in relative loss"),
}

GRID_NOTE = ("width = log10(highest / lowest learning rate) of the contiguous run of tried rates around the best one "
             "whose mean over seeds stays within the tolerance of the optimizer's own best; a rate with a diverged "
             "or failed run ends it; 0: only the best rate qualifies; the width is bounded by the tried grid "
             "(≥: the interval reaches the end of the grid, so it may extend further)")  # fmt: skip


def tolerance_for(experiment: str, metric: str) -> Tolerance | None:
    """The tolerance of :data:`TOLERANCES` for this experiment's metric, or ``None`` when none is defined."""
    return TOLERANCES.get((experiment, metric))


@dataclass
class OptimizerRobustness:
    optimizer: str
    best_lr: float  # nan: no learning rate where every run finished with a finite value
    best: float  # mean over seeds at best_lr
    lr_low: float  # the interval of learning rates within the tolerance of best
    lr_high: float
    width: float  # log10(lr_high / lr_low), decades (nan when best is nan)
    at_edge: bool  # the interval reaches the smallest or largest tried rate: the width is a lower bound
    lrs: list[float]  # the tried rates
    bad_lrs: list[float]  # rates with a diverged or failed run
    left_out: int  # running / interrupted runs (in no value)


@dataclass
class Robustness:
    experiment: str
    metric: str
    higher: bool
    tolerance: Tolerance
    rows: list[OptimizerRobustness]
    overall_best: float
    eligible: list[str]  # optimizers whose best is within the tolerance of the overall best
    excluded: dict[str, str]  # the other optimizers -> why
    most_robust: list[str]  # the eligible optimizers of the widest interval (several on a tie)

    def row(self, optimizer: str) -> OptimizerRobustness:
        return next(r for r in self.rows if r.optimizer == optimizer)


def format_width(row: OptimizerRobustness) -> str:
    """``"0.48"``, ``"≥ 1.00"`` (interval reaching the end of the tried grid), ``"-"`` (no finite value)."""
    if not math.isfinite(row.width):
        return "-"
    return ("≥ " if row.at_edge else "") + f"{row.width:.2f}"


def _robust_row(optimizer: str, points: list[LrPoint], tol: Tolerance, higher: bool) -> OptimizerRobustness:
    points = sorted((p for p in points if p.runs or p.left_out), key=lambda p: p.lr)
    clean = [i for i, p in enumerate(points) if p.clean]
    lrs = [p.lr for p in points]
    bad = [p.lr for p in points if p.diverged]
    left_out = sum(p.left_out for p in points)
    if not clean:
        nan = float("nan")
        return OptimizerRobustness(optimizer, nan, nan, nan, nan, nan, False, lrs, bad, left_out)
    sign = -1.0 if higher else 1.0
    b = min(clean, key=lambda i: (sign * points[i].mean, points[i].lr))
    best = points[b].mean
    lo = hi = b
    while lo > 0 and points[lo - 1].clean and tol.within(points[lo - 1].mean, best, higher):
        lo -= 1
    while hi < len(points) - 1 and points[hi + 1].clean and tol.within(points[hi + 1].mean, best, higher):
        hi += 1
    return OptimizerRobustness(
        optimizer, points[b].lr, best, points[lo].lr, points[hi].lr, math.log10(points[hi].lr / points[lo].lr),
        lo == 0 or hi == len(points) - 1, lrs, bad, left_out,
    )  # fmt: skip


def lr_robustness(points_by_optimizer: dict[str, list[LrPoint]], experiment: str, metric: str, higher: bool,
                  tolerance: Tolerance | None = None) -> Robustness:  # fmt: skip
    """The learning-rate robustness of each optimizer of one comparable group of runs (one panel, one preset).

    Per optimizer: its best value (the best mean over seeds among the learning rates where every run finished with
    a finite value), and the width in decades of the interval of tried learning rates around the best one whose
    means stay within ``tolerance`` (default :func:`tolerance_for`) of that best -- a rate with a diverged or
    failed run, or whose runs are all still running, ends the interval (see :data:`GRID_NOTE`). The most robust
    optimizer is the one of the widest interval among those whose best is itself within the tolerance of the
    overall best, so a uniformly poor optimizer is never named; the others are listed in ``excluded`` with why.
    """
    tol = tolerance or tolerance_for(experiment, metric)
    if tol is None:
        raise LookupError(f"no LR-robustness tolerance for metric '{metric}' of experiment '{experiment}'; "
                          f"add one to main_figures.metrics.TOLERANCES (defined: {sorted(TOLERANCES)})")  # fmt: skip
    rows = [_robust_row(opt, pts, tol, higher) for opt, pts in points_by_optimizer.items()]
    finite = [r.best for r in rows if math.isfinite(r.best)]
    overall = (max if higher else min)(finite) if finite else float("nan")
    eligible, excluded = [], {}
    for r in rows:
        if not math.isfinite(r.best):
            excluded[r.optimizer] = "no learning rate where every run finished with a finite value"
        elif not tol.within(r.best, overall, higher):
            excluded[r.optimizer] = f"best {r.best:.3g} is not within {tol.text} of the overall best {overall:.3g}"
        else:
            eligible.append(r.optimizer)
    widest = max((r.width for r in rows if r.optimizer in eligible), default=float("nan"))
    most = [r.optimizer for r in rows if r.optimizer in eligible and math.isclose(r.width, widest, abs_tol=1e-9)]
    return Robustness(experiment, metric, higher, tol, rows, overall, eligible, excluded, most)


def robustness_verdict(rob: Robustness, label=str, value=lambda v: f"{v:.3g}") -> list[str]:
    """The "most robust" lines (Markdown bullets) of every LR-robustness table: the optimizers of the widest
    interval among those whose best is within the tolerance of the overall best, and the ones left out of that
    ranking with why. ``label`` gives an optimizer's display name, ``value`` formats a metric value."""
    tol = rob.tolerance.text
    eligible = [rob.row(o) for o in rob.eligible]
    if not eligible:
        return ["- Most robust to the learning rate: none (no optimizer finished a learning rate with a finite value)."]
    rule = (f"- Most robust to the learning rate (the widest interval within {tol} of its own best, among the "
            f"optimizers whose best is within {tol} of the overall best {value(rob.overall_best)}): ")  # fmt: skip
    top = [rob.row(o) for o in rob.most_robust]
    others = [r for r in eligible if r.optimizer not in rob.most_robust]
    rest = ("; the others: " + ", ".join(f"{label(r.optimizer)} {format_width(r)}" for r in others)) if others else ""
    if len(eligible) == 1:
        out = [rule + f"**{label(top[0].optimizer)}**, the only one within {tol} of the overall best "
                      f"({format_width(top[0])} decades)."]  # fmt: skip
    elif len(top) == 1:
        out = [rule + f"**{label(top[0].optimizer)}** ({format_width(top[0])} decades, lr {top[0].lr_low:g} … "
                      f"{top[0].lr_high:g}{rest})."]  # fmt: skip
    else:
        out = [rule + f"a tie between {', '.join(label(r.optimizer) for r in top)} ({format_width(top[0])} decades "
                      f"each{rest})."]  # fmt: skip
    far = [rob.row(o) for o in rob.excluded if math.isfinite(rob.row(o).best)]
    if far:
        out.append(f"- Not ranked for robustness, their best is not within {tol} of the overall best: "
                   + ", ".join(f"{label(r.optimizer)} ({value(r.best)})" for r in far) + ".")
    none = [o for o in rob.excluded if not math.isfinite(rob.row(o).best)]
    if none:
        out.append("- Not ranked for robustness, no learning rate where every run finished with a finite value: "
                   + ", ".join(label(o) for o in none) + ".")
    return out
