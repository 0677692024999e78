"""Learning-rate robustness: the final metric vs the learning rate (log x), one line per optimizer, one panel per
group of comparable runs (same tags: preset, task, kappa, ...), with each optimizer's interval of learning rates
within the tolerance of its own best (``metrics.lr_robustness``). Works on any experiment's records."""

from __future__ import annotations

import math
import textwrap
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from main_figures.metrics import facet_key, facet_sort_key, facet_title, lr_points, main_metric
from main_figures.metrics import format_width, lr_robustness, run_outcome, tolerance_for
from main_figures.style import apply_style, optimizer_sort_key, optimizer_style, savefig
from main_figures.style import optimizer_label

__all__ = [
    "lr_sweeps", "facet_metric", "sweep_robustness", "is_swept", "lr_robustness_figure", "robustness_summary",
]  # fmt: skip


def lr_sweeps(records: Iterable, experiment: str) -> tuple[str, bool, dict[tuple, dict[str, list]]]:
    """(metric, higher_is_better, {facet: {optimizer: [LrPoint, ...]}}) for the experiment's records.

    A run that diverged or failed (or is still running) without a main metric joins its facet's metric, so that it
    is marked at its learning rate instead of dropped; a finished run without one (not scored) is not plotted. The
    theory's sensitivity runs (tag ``perturbation``: the grid again from perturbed starts) are not a learning-rate
    sweep of their own; the theory table reports them."""
    records = [r for r in records if "perturbation" not in r.tags]
    metrics = {m for m in (main_metric(experiment, r) for r in records) if m is not None}
    if not metrics:
        raise ValueError(f"no numeric final metric in the {len(records)} '{experiment}' records")
    if len(metrics) > 1:  # e.g. GLUE tasks with different metrics: one panel per task keeps them apart anyway
        metric, higher = "main metric", next(iter(metrics))[1]
    else:
        metric, higher = next(iter(metrics))
    groups = defaultdict(lambda: defaultdict(list))
    unscored = []
    for rec in records:
        m = main_metric(experiment, rec)
        if m is not None:
            groups[(facet_key(rec), m[0])][rec.optimizer].append(rec)
        elif run_outcome(rec) != "done":
            unscored.append(rec)
    for rec in unscored:
        names = {name for facet, name in groups if facet == facet_key(rec)} or {m[0] for m in metrics}
        if len(names) != 1:
            warnings.warn(f"'{experiment}' run '{rec.run_name}' ({run_outcome(rec)}) has no main metric and its "
                          f"group has several ({sorted(names)}); it is not shown", stacklevel=2)  # fmt: skip
            continue
        groups[(facet_key(rec), names.pop())][rec.optimizer].append(rec)
    sweeps = {}
    for (facet, name), by_opt in groups.items():
        key = facet if len(metrics) == 1 else facet + (("metric", name),)
        sweeps[key] = {opt: lr_points(recs, name) for opt, recs in by_opt.items()}
    return metric, higher, sweeps


def facet_metric(facet: tuple, metric: str) -> str:
    """The metric of one facet of :func:`lr_sweeps` (its ``metric`` tag when the experiment has several)."""
    return dict(facet).get("metric", metric)


def sweep_robustness(experiment: str, metric: str, higher: bool, facet: tuple, by_opt: dict):
    """:func:`metrics.lr_robustness` of one facet, or ``None`` when no tolerance is defined for its metric."""
    name = facet_metric(facet, metric)
    if tolerance_for(experiment, name) is None:
        return None
    return lr_robustness({o: by_opt[o] for o in sorted(by_opt, key=optimizer_sort_key)}, experiment, name, higher)


def is_swept(records: Iterable, experiment: str) -> bool:
    """Whether some optimizer ran at two or more learning rates on comparable runs."""
    records = [r for r in records if "lr" in r.hparams]
    if not records:
        return False
    try:
        _, _, sweeps = lr_sweeps(records, experiment)
    except ValueError:
        return False
    return any(len(points) >= 2 for by_opt in sweeps.values() for points in by_opt.values())


def robustness_summary(records: Iterable, experiment: str) -> list[str]:
    """Markdown table rows (``| experiment | group | tolerance | best | most robust | not ranked |``), one per group
    of runs that sweeps the learning rate and has a tolerance (for ``summary.md``)."""
    records = list(records)
    if not is_swept(records, experiment):
        return []
    metric, higher, sweeps = lr_sweeps(records, experiment)
    lines = []
    for facet in sorted(sweeps, key=facet_sort_key):
        if not any(len(p) >= 2 for p in sweeps[facet].values()):
            continue
        rob = sweep_robustness(experiment, metric, higher, facet, sweeps[facet])
        if rob is None:
            lines.append(f"| {experiment} | {facet_title(facet)} | none defined | | | |")
            continue
        best = [r for r in rob.rows if r.best == rob.overall_best]
        top = ", ".join(f"{optimizer_label(o)} ({format_width(rob.row(o))})" for o in rob.most_robust) or "-"
        out = ", ".join(optimizer_label(o) for o in rob.excluded) or "-"
        lines.append(f"| {experiment} | {facet_title(facet)} | {rob.tolerance.text} | "
                     + ", ".join(f"{optimizer_label(r.optimizer)} {r.best:.3g}" for r in best) + f" | {top} | {out} |")
    return lines


def _robustness_lines(rob, opts) -> list[tuple[str, str]]:
    """(text, optimizer) lines under a panel: each optimizer's width, the most robust one, the excluded ones."""
    lines = []
    for opt in opts:
        row = rob.row(opt)
        mark = " ★" if opt in rob.most_robust else (" (not ranked)" if opt in rob.excluded else "")
        best = "no finite value" if not math.isfinite(row.best) else f"best {row.best:.3g} @ {row.best_lr:g}"
        lines.append((f"{optimizer_label(opt)}: {best}, width {format_width(row)}{mark}", opt))
    return lines


def lr_robustness_figure(records: Iterable, experiment: str, out_png: str | Path, max_cols: int = 5) -> Path:
    """Plot the final metric vs learning rate; a learning rate with a diverged or failed run is drawn as an x at the
    bottom (higher-is-better metrics) or top edge of its panel. The thick pale segment is the interval of learning
    rates within the tolerance of the optimizer's own best (:func:`metrics.lr_robustness`), listed under the panel
    with its width in decades; ★ marks the most robust optimizer."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    from matplotlib.transforms import blended_transform_factory

    metric, higher, sweeps = lr_sweeps(records, experiment)
    facets = sorted((f for f in sweeps if any(len(p) >= 2 for p in sweeps[f].values())), key=facet_sort_key)
    if not facets:
        raise ValueError(f"no '{experiment}' runs sweep the learning rate")
    cols = min(max_cols, len(facets))
    rows = math.ceil(len(facets) / cols)
    n_lines = max(len(sweeps[f]) for f in facets) + 1
    panel_h, text_h = 3.0, 0.15 * n_lines + 0.4
    apply_style()
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.8 * cols, 6.4), (panel_h + text_h) * rows + 0.9),
                             squeeze=False)  # fmt: skip
    for ax in axes.flat[len(facets) :]:
        ax.set_visible(False)
    handles = {}
    left_out = 0
    for ax, facet in zip(axes.flat, facets):
        values = [p.mean for pts in sweeps[facet].values() for p in pts if math.isfinite(p.mean)]
        log_y = not higher and values and min(values) > 0 and max(values) / min(values) > 10
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        rob = sweep_robustness(experiment, metric, higher, facet, sweeps[facet])
        opts = sorted(sweeps[facet], key=optimizer_sort_key)
        for i, opt in enumerate(opts):
            style = optimizer_style(opt)
            pts = sweeps[facet][opt]
            left_out += sum(p.left_out for p in pts)
            ok = [p for p in pts if math.isfinite(p.mean)]
            (line,) = ax.plot([p.lr for p in ok], [p.mean for p in ok], color=style["color"], marker=style["marker"],
                              linestyle=style["linestyle"], label=style["label"])  # fmt: skip
            handles[style["label"]] = line
            spread = [p for p in ok if p.runs - p.diverged > 1]
            if spread:
                ax.vlines([p.lr for p in spread], [p.low for p in spread], [p.high for p in spread],
                          color=style["color"], alpha=0.5)  # fmt: skip
            bad = [p.lr for p in pts if p.diverged]
            if bad:
                y = 0.03 + 0.035 * i  # one height per optimizer, so that marks at one rate do not hide each other
                ax.plot(bad, [1 - y if not higher else y] * len(bad), transform=edge, linestyle="none",
                        marker="x", color=style["color"], markersize=7, clip_on=False)  # fmt: skip
            if rob is not None and math.isfinite(rob.row(opt).best):
                row = rob.row(opt)
                ax.plot([row.lr_low, row.lr_high], [row.best, row.best], color=style["color"], alpha=0.25,
                        linewidth=6, solid_capstyle="round")  # fmt: skip
                if opt in rob.most_robust:
                    ax.plot([row.best_lr], [row.best], marker="*", color=style["color"], markersize=13,
                            markeredgecolor="black", markeredgewidth=0.5, linestyle="none", zorder=5)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_title(textwrap.fill(facet_title(facet), width=46), fontsize=9)  # a panel is about 46 characters wide
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {metric}" + ("" if higher else " (lower is better)"))
        if rob is None:
            lines = [(f"no tolerance defined for {facet_metric(facet, metric)}: widths not computed", None)]
        else:
            lines = [(f"width (decades) within {rob.tolerance.text} of own best:", None)] + _robustness_lines(rob, opts)
        for i, (text, opt) in enumerate(lines):
            ax.annotate(text, (0, 0), xycoords="axes fraction", xytext=(0, -36 - 9 * i), textcoords="offset points",
                        fontsize=6.5, va="top", color=optimizer_style(opt)["color"] if opt else "black",
                        annotation_clip=False)  # fmt: skip
    notes = ["x: a learning rate with a diverged or failed run; pale bar: the interval within the tolerance of the "
             "optimizer's own best",
             "★: the widest interval among the optimizers whose best is within the tolerance of the overall best "
             "(the others: not ranked); widths bounded by the tried grid (≥: the interval reaches its end)"]  # fmt: skip
    if left_out:
        notes.append(f"{left_out} running / interrupted run(s) left out")
    title_h = 0.16 * (1 + len(notes)) + 0.05  # inches: the title and its notes, then the legend below them
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, 1 - (title_h + 0.3) / height))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 4 if cols == 1 else 7),
               bbox_to_anchor=(0.5, 1 - title_h / height), frameon=False)  # fmt: skip
    fig.suptitle(f"{experiment}: final {metric} vs learning rate\n" + "\n".join(notes), y=1.0, fontsize=8.5)
    return savefig(fig, out_png)
