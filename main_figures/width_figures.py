"""Figures and tables of the width experiment, from its records (``results/width/*.json``).

Rules (the same for every optimizer series):

* A run's value is its final relative loss ``L / L(B = 0)``; diverged and failed runs (``metrics.run_outcome``) are
  never values, running and interrupted runs are left out.
* **Best learning rate** of one (series, width, seed): the grid point of the lowest final loss, refined by the vertex
  of the parabola through it and its two neighbours in (log lr, log loss) when both neighbours are values (the
  vertex is kept within the neighbours). A best rate at the edge of the grid is kept as the grid point and flagged.
* **Slope**: the least-squares slope of log10(best lr) against log10(width), per seed; reported as the mean, the
  standard deviation and the range over seeds. 0 is a width-independent rate, -1 a Θ(1/n) one.
* **Feature update**: ``‖s B A h‖ / √n`` (the run's ``feature_update_rms``) at the grid's best rate, the mean over
  seeds.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from main_figures.metrics import counts_as_result, run_outcome
from main_figures.style import apply_style, optimizer_style, savefig

__all__ = [
    "SERIES_ORDER", "series_label", "best_lr", "width_points", "optimal_lrs", "width_slopes", "Slope",
    "width_transfer_figure", "width_optimal_lr_figure", "width_feature_figure", "width_table",
    "lora_scale_best", "lora_scale_figure", "lora_scale_table", "glue_lora_scale_best", "glue_lora_scale_table",
]  # fmt: skip

SERIES_ORDER = ("adamw", "scaled_adamw_gradient", "scaled_adamw_update", "loraplus", "sgd", "scaled_gd")
_LABELS = {
    "scaled_adamw_gradient": "scaled AdamW (gradient variant)",
    "scaled_adamw_update": "scaled AdamW (update variant)",
    "loraplus": "LoRA+ (lr_B = 16 lr_A)",
    "sgd": "GD",
    "scaled_gd": "scaled GD",
}


def series_label(series: str) -> str:
    return _LABELS.get(series, optimizer_style(series)["label"])


def _series_style(series: str) -> dict:
    style = optimizer_style(series.removesuffix("_gradient").removesuffix("_update"))
    if series.endswith("_update"):
        style.update(color="#009E73", marker="o", linestyle=":")
    style["label"] = series_label(series)
    return style


def _index(series: str) -> tuple[int, str]:
    return (SERIES_ORDER.index(series) if series in SERIES_ORDER else len(SERIES_ORDER), series)


def _order(series: Iterable[str]) -> list[str]:
    return sorted(series, key=_index)


@dataclass
class Point:
    """One learning rate of one (series, width, seed): its final relative loss (nan: not a value) and feature
    update."""

    lr: float
    loss: float
    feature: float
    outcome: str


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _point(record) -> Point:
    m = record.final_metrics
    done = run_outcome(record) == "done"
    loss = _float(m.get("relative_loss")) if done else float("nan")
    return Point(float(record.hparams["lr"]), loss, _float(m.get("feature_update_rms")), run_outcome(record))


def width_points(records: Iterable, study: str = "width") -> dict[tuple[str, int, int], list[Point]]:
    """Points per (series, width, seed) of one study, sorted by learning rate."""
    out = defaultdict(list)
    for rec in records:
        if rec.tags.get("study") != study or not counts_as_result(rec):
            continue
        out[(rec.tags["series"], int(rec.tags["width"]), int(rec.seed))].append(_point(rec))
    return {k: sorted(v, key=lambda p: p.lr) for k, v in out.items()}


@dataclass
class BestLr:
    lr: float  # refined (see the module docstring)
    grid_lr: float
    loss: float  # at the grid point
    feature: float  # at the grid point
    at_edge: bool


def best_lr(points: list[Point]) -> BestLr | None:
    """The best learning rate of one sweep by the rule of the module docstring (``None``: no value at all)."""
    values = [i for i, p in enumerate(points) if math.isfinite(p.loss) and p.loss > 0]
    if not values:
        return None
    i = min(values, key=lambda j: points[j].loss)
    best = points[i]
    at_edge = i == 0 or i == len(points) - 1
    lr = best.lr
    if not at_edge and all(math.isfinite(points[j].loss) and points[j].loss > 0 for j in (i - 1, i + 1)):
        x = [math.log10(points[j].lr) for j in (i - 1, i, i + 1)]
        y = [math.log10(points[j].loss) for j in (i - 1, i, i + 1)]
        den = (x[1] - x[0]) * (y[1] - y[2]) - (x[1] - x[2]) * (y[1] - y[0])
        if den != 0:
            num = (x[1] - x[0]) ** 2 * (y[1] - y[2]) - (x[1] - x[2]) ** 2 * (y[1] - y[0])
            lr = 10 ** min(max(x[1] - 0.5 * num / den, x[0]), x[2])
    return BestLr(lr, best.lr, best.loss, best.feature, at_edge)


def optimal_lrs(records: Iterable) -> dict[tuple[str, int, int], BestLr]:
    """The best learning rate per (series, width, seed) of the width study."""
    out = {}
    for key, points in width_points(records).items():
        best = best_lr(points)
        if best is not None:
            out[key] = best
    return out


@dataclass
class Slope:
    """The slope of log10(best lr) vs log10(width) of one series over seeds."""

    series: str
    per_seed: dict[int, float]
    widths: list[int]
    edge_points: int  # best rates at the edge of the grid (the slope is then a bound, not a measurement)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_seed.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.per_seed.values()) if len(self.per_seed) > 1 else 0.0


def width_slopes(records: Iterable) -> dict[str, Slope]:
    """Per series, the slope of each seed (seeds with a best rate at fewer than 3 widths are skipped)."""
    best = optimal_lrs(records)
    out = {}
    for series in _order({k[0] for k in best}):
        per_seed, edges, widths = {}, 0, set()
        for seed in sorted({k[2] for k in best if k[0] == series}):
            pts = sorted((w, b) for (s, w, sd), b in best.items() if s == series and sd == seed)
            if len(pts) < 3:
                continue
            x = np.log10([w for w, _ in pts])
            y = np.log10([b.lr for _, b in pts])
            per_seed[seed] = float(np.polyfit(x, y, 1)[0])
            edges += sum(b.at_edge for _, b in pts)
            widths.update(w for w, _ in pts)
        if per_seed:
            out[series] = Slope(series, per_seed, sorted(widths), edges)
    return out


def _geomean(values: list[float]) -> float:
    return 10 ** statistics.fmean(math.log10(v) for v in values) if values else float("nan")


def _by_width(best: dict, series: str) -> dict[int, list[BestLr]]:
    out = defaultdict(list)
    for (s, w, _), b in best.items():
        if s == series:
            out[w].append(b)
    return dict(sorted(out.items()))


def _require(records: list, study: str) -> None:
    if not any(r.tags.get("study") == study for r in records):
        raise ValueError(f"no '{study}' records of the width experiment; run: python main_figures/width.py")


def width_transfer_figure(records: Iterable, path: str | Path) -> Path:
    """Final relative loss vs learning rate, one curve per width (mean over seeds), one panel per series."""
    import matplotlib.pyplot as plt

    records = list(records)
    _require(records, "width")
    points = width_points(records)
    series = _order({k[0] for k in points})
    widths = sorted({k[1] for k in points})
    apply_style()
    cols = 3
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(widths)))
    for ax, s in zip(axes.flat, series):
        for color, w in zip(colors, widths):
            sweeps = [v for (ss, ww, _), v in points.items() if ss == s and ww == w]
            lrs = sorted({p.lr for sweep in sweeps for p in sweep})
            xs, ys, bad = [], [], []
            for lr in lrs:
                losses = [p.loss for sweep in sweeps for p in sweep if p.lr == lr]
                if losses and all(math.isfinite(v) for v in losses):
                    xs.append(lr)
                    ys.append(statistics.fmean(losses))
                else:
                    bad.append(lr)
            ax.plot(xs, ys, color=color, marker=".", label=f"n = {w}")
            if bad:
                ax.plot(bad, [1.5] * len(bad), linestyle="none", marker="x", color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(series_label(s))
        ax.set_xlabel("learning rate (A and B)")
        ax.set_ylabel("final loss / initial loss")
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    axes.flat[0].legend(title="x: diverged", loc="lower left")
    fig.suptitle("Loss vs learning rate across widths (mean over seeds)")
    fig.tight_layout()
    return savefig(fig, path)


def width_optimal_lr_figure(records: Iterable, path: str | Path) -> Path:
    """The best learning rate vs width on log-log axes (geometric mean over seeds, bars: min-max), with the fit."""
    import matplotlib.pyplot as plt

    records = list(records)
    _require(records, "width")
    best, slopes = optimal_lrs(records), width_slopes(records)
    apply_style()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for s in _order({k[0] for k in best}):
        by_width = _by_width(best, s)
        widths = list(by_width)
        mid = [_geomean([b.lr for b in v]) for v in by_width.values()]
        lo = [m - min(b.lr for b in v) for m, v in zip(mid, by_width.values())]
        hi = [max(b.lr for b in v) - m for m, v in zip(mid, by_width.values())]
        style = _series_style(s)
        sl = slopes.get(s)
        label = f"{style['label']}: slope {sl.mean:+.2f} ± {sl.std:.2f}" if sl else style["label"]
        ax.errorbar(widths, mid, yerr=[lo, hi], color=style["color"], marker=style["marker"], linestyle="none",
                    capsize=2, label=label)  # fmt: skip
        if len(widths) < 2:
            continue
        fit = np.polyfit(np.log10(widths), np.log10(mid), 1)
        xs = np.array([widths[0], widths[-1]])
        ax.plot(xs, 10 ** np.polyval(fit, np.log10(xs)), color=style["color"], linestyle=style["linestyle"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n")
    ax.set_ylabel("best learning rate")
    ax.set_title("Best learning rate vs width (slope ± std over seeds)")
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    return savefig(fig, path)


def width_feature_figure(records: Iterable, path: str | Path) -> Path:
    """``‖s B A h‖ / √n`` at the best learning rate vs width (mean over seeds)."""
    import matplotlib.pyplot as plt

    records = list(records)
    _require(records, "width")
    best = optimal_lrs(records)
    apply_style()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in _order({k[0] for k in best}):
        by_width = _by_width(best, s)
        style = _series_style(s)
        ax.plot(list(by_width), [statistics.fmean(b.feature for b in v) for v in by_width.values()],
                color=style["color"], marker=style["marker"], linestyle=style["linestyle"], label=style["label"])  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n")
    ax.set_ylabel("‖Δ(BA) h‖ / √n at the best LR")
    ax.set_title("Size of the learned feature update")
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    return savefig(fig, path)


def _fmt(value: float, spec: str = ".3g") -> str:
    return format(value, spec) if math.isfinite(value) else "-"


def width_table(records: Iterable) -> str:
    """Markdown: the slope per series, then best lr / loss / feature update per width."""
    records = list(records)
    _require(records, "width")
    best, slopes = optimal_lrs(records), width_slopes(records)
    widths = sorted({k[1] for k in best})
    lines = [
        "**Slope of log10(best lr) vs log10(width)** (per seed; 0: width-independent, -1: Θ(1/n))",
        "",
        "| optimizer | slope (mean ± std over seeds) | range | seeds | best rates at the grid's edge |",
        "|---|---:|---:|---:|---:|",
    ]
    present = _order({k[0] for k in best})
    for s in present:
        sl = slopes.get(s)
        if sl is None:
            lines.append(f"| {series_label(s)} | - (fewer than 3 widths) | - | 0 | - |")
            continue
        lines.append(f"| {series_label(s)} | {sl.mean:+.2f} ± {sl.std:.2f} | {min(sl.per_seed.values()):+.2f} ... "
                     f"{max(sl.per_seed.values()):+.2f} | {len(sl.per_seed)} | {sl.edge_points} |")  # fmt: skip
    for title, value in [
        ("best learning rate (geometric mean over seeds)", lambda v: _fmt(_geomean([b.lr for b in v]))),
        ("final loss / initial loss at the best grid rate (mean over seeds)",
         lambda v: _fmt(statistics.fmean(b.loss for b in v))),
        ("feature update ‖Δ(BA) h‖ / √n at the best grid rate (mean over seeds)",
         lambda v: _fmt(statistics.fmean(b.feature for b in v))),
    ]:  # fmt: skip
        lines += ["", f"**{title}**", "", "| optimizer | " + " | ".join(f"n = {w}" for w in widths) + " |",
                  "|---|" + "---:|" * len(widths)]  # fmt: skip
        for s in present:
            by_width = _by_width(best, s)
            lines.append(f"| {series_label(s)} | "
                         + " | ".join(value(by_width[w]) if w in by_width else "-" for w in widths) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# LoRA scale study
# ----------------------------------------------------------------------------------------------------------------


def _scaling(tags: dict) -> float:
    r, alpha = int(tags["rank"]), float(tags["alpha"])
    return alpha / (math.sqrt(r) if tags.get("rslora") else r)


def _best_per_setting(items: Iterable[tuple[tuple, float, Point]]) -> dict[tuple, tuple[float, BestLr]]:
    """``(setting, s, point)`` items -> per setting: s and the best learning rate (the points of one rate pooled by
    their mean, over seeds)."""
    groups, scales = defaultdict(lambda: defaultdict(list)), {}
    for key, scale, point in items:
        scales[key] = scale
        groups[key][point.lr].append(point)
    out = {}
    for key, by_lr in groups.items():
        points = [Point(lr, statistics.fmean(p.loss for p in ps), statistics.fmean(p.feature for p in ps), "")
                  for lr, ps in sorted(by_lr.items())]  # fmt: skip
        best = best_lr(points)
        if best is not None:
            out[key] = (scales[key], best)
    return out


def lora_scale_best(records: Iterable) -> dict[tuple[str, int, float, bool], tuple[float, BestLr]]:
    """Per (series, rank, alpha, rslora) of the width experiment's ``lora_scale`` study: the LoRA scaling s and the
    best learning rate (seeds pooled by mean loss at each rate)."""
    return _best_per_setting(
        ((t["series"], int(t["rank"]), float(t["alpha"]), bool(t.get("rslora"))), _scaling(t), _point(rec))
        for rec in records if (t := rec.tags).get("study") == "lora_scale" and counts_as_result(rec))


def _glue_lora_scale_runs(records: Iterable) -> list[tuple[tuple[str, int, float, bool], float, Point]]:
    """``(setting, s, point)`` of every GLUE run of the ``lora_scale`` sweep that counts as a result: rank, alpha and
    rsLoRA from the run's ``lora`` config; the point's value is the dev error rate, 1 - accuracy (nan for a
    diverged or failed run)."""
    runs = []
    for rec in records:
        if rec.tags.get("sweep") != "lora_scale" or not counts_as_result(rec):
            continue
        lora = rec.config["lora"]
        tags = {"rank": lora["r"], "alpha": lora["alpha"], "rslora": lora.get("rslora", False)}
        series = rec.optimizer if rec.optimizer != "scaled_adamw" else (
            f"scaled_adamw_{rec.hparams.get('variant', 'gradient')}")
        accuracy = rec.final_metrics.get("accuracy")
        error = 1.0 - float(accuracy) if run_outcome(rec) == "done" and accuracy is not None else float("nan")
        key = (series, int(lora["r"]), float(lora["alpha"]), bool(tags["rslora"]))
        runs.append((key, _scaling(tags), Point(float(rec.hparams["lr"]), error, float("nan"), run_outcome(rec))))
    return runs


def glue_lora_scale_best(records: Iterable) -> dict[tuple[str, int, float, bool], tuple[float, BestLr]]:
    """The same for the GLUE runs of the ``lora_scale`` sweep (MiniLM on SST-2, ``Mistral-7B/conf/sweep/
    minilm_lora_scale*.yaml``), by the dev error rate (:func:`_glue_lora_scale_runs`)."""
    return _best_per_setting(_glue_lora_scale_runs(records))


def lora_scale_slopes(best: dict) -> dict[str, float]:
    """Per series, the slope of log10(best lr) vs log10(s) over every (rank, alpha) setting."""
    out = {}
    for s in _order({k[0] for k in best}):
        pts = [(scale, b.lr) for k, (scale, b) in best.items() if k[0] == s]
        if len({p[0] for p in pts}) >= 2:
            out[s] = float(np.polyfit(np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts]), 1)[0])
    return out


def lora_scale_figure(records: Iterable, path: str | Path) -> Path:
    """Best learning rate vs the LoRA scaling s, per series (marker per rank; hollow: rsLoRA)."""
    import matplotlib.pyplot as plt

    best = lora_scale_best(records)
    if not best:
        raise ValueError("no 'lora_scale' records of the width experiment; run: python main_figures/width.py")
    slopes = lora_scale_slopes(best)
    apply_style()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {4: "o", 16: "s", 64: "^"}
    for s in _order({k[0] for k in best}):
        style = _series_style(s)
        items = sorted((scale, b.lr, k) for k, (scale, b) in best.items() if k[0] == s)
        for scale, lr, k in items:
            ax.plot([scale], [lr], linestyle="none", marker=markers.get(k[1], "*"), color=style["color"],
                    markerfacecolor="none" if k[3] else style["color"])  # fmt: skip
        if s in slopes:
            xs = np.array([items[0][0], items[-1][0]])
            fit = np.polyfit(np.log10([i[0] for i in items]), np.log10([i[1] for i in items]), 1)
            ax.plot(xs, 10 ** np.polyval(fit, np.log10(xs)), color=style["color"], linestyle=style["linestyle"],
                    label=f"{style['label']}: lr* ∝ s^{slopes[s]:.2f}")  # fmt: skip
    for r, m in markers.items():
        ax.plot([], [], linestyle="none", marker=m, color="gray", label=f"r = {r}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA scaling s = alpha / r (hollow: rsLoRA, alpha / √r)")
    ax.set_ylabel("best learning rate")
    ax.set_title("Best learning rate vs LoRA scaling")
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    return savefig(fig, path)


def _lora_scale_lines(best: dict, value_header: str, value) -> list[str]:
    lines = [f"| optimizer | r | alpha | s | best lr | best lr x s | {value_header} |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key in sorted(best, key=lambda k: (_index(k[0]), k[1], k[3], k[2])):
        scale, b = best[key]
        series, rank, alpha, rslora = key
        edge = " (edge)" if b.at_edge else ""
        lines.append(f"| {series_label(series)} | {rank} | {alpha:g}{' (rsLoRA)' if rslora else ''} | {scale:.3g} | "
                     f"{b.lr:.3g}{edge} | {b.lr * scale:.3g} | {value(key, b)} |")  # fmt: skip
    slopes = lora_scale_slopes(best)
    return lines + ["", "Fitted exponent beta of best lr ∝ s^beta (over all ranks and alphas): "
                    + ", ".join(f"{series_label(s)} {v:+.2f}" for s, v in slopes.items())]  # fmt: skip


def lora_scale_table(records: Iterable) -> str:
    """Markdown: per series, the best learning rate of every (rank, alpha) and the product lr* x s."""
    best = lora_scale_best(records)
    if not best:
        raise ValueError("no 'lora_scale' records of the width experiment; run: python main_figures/width.py")
    return "\n".join(_lora_scale_lines(best, "final loss / initial", lambda key, b: _fmt(b.loss))) + "\n"


def glue_lora_scale_table(records: Iterable) -> str:
    """Markdown: the same for MiniLM on SST-2 (dev accuracy at the best grid rate)."""
    runs = _glue_lora_scale_runs(records)
    best = _best_per_setting(runs)
    if not best:
        raise ValueError("no 'lora_scale' sweep among the GLUE records; run: bash Mistral-7B/scripts/sweep.sh "
                         "minilm_lora_scale, then minilm_lora_scale_rslora")
    tried = defaultdict(set)  # the learning rates each setting has finished runs of: a partial grid shows here
    for key, _, point in runs:
        tried[key].add(point.lr)
    too_few = sorted(k for k in best if len(tried[k]) < 3)  # no best rate to speak of: listed, not fitted
    best = {k: v for k, v in best.items() if k not in too_few}
    lines = _lora_scale_lines(best, "dev accuracy (learning rates run)", lambda key, b: (
        f"{1 - b.loss:.4f} ({len(tried[key])}: {min(tried[key]):g} ... {max(tried[key]):g})")) if best else []
    if too_few:
        lines += ["", "Left out (fewer than 3 learning rates run so far): " + "; ".join(
            f"{series_label(s)} r {r} alpha {a:g}{' rsLoRA' if rs else ''} ({len(tried[(s, r, a, rs)])})"
            for s, r, a, rs in too_few)]
    return "\n".join(["MiniLM-L6 on SST-2 (`preset=minilm_sst2`), best learning rate by dev accuracy; the sweeps run "
                      "6 learning rates per setting, fewer is a partial grid.", ""] + lines) + "\n"
