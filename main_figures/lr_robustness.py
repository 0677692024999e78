"""Learning-rate robustness: the final metric vs the learning rate (log x), one line per optimizer, one panel per
group of comparable runs (same tags: preset, task, kappa, ...). Works on any experiment's records."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from main_figures.metrics import facet_key, facet_sort_key, facet_title, lr_points, main_metric
from main_figures.style import apply_style, optimizer_sort_key, optimizer_style, savefig

__all__ = ["lr_sweeps", "is_swept", "lr_robustness_figure"]


def lr_sweeps(records: Iterable, experiment: str) -> tuple[str, bool, dict[tuple, dict[str, list]]]:
    """(metric, higher_is_better, {facet: {optimizer: [LrPoint, ...]}}) for the experiment's records."""
    records = list(records)
    metrics = {m for m in (main_metric(experiment, r) for r in records) if m is not None}
    if not metrics:
        raise ValueError(f"no numeric final metric in the {len(records)} '{experiment}' records")
    if len(metrics) > 1:  # e.g. GLUE tasks with different metrics: one panel per task keeps them apart anyway
        metric, higher = "main metric", next(iter(metrics))[1]
    else:
        metric, higher = next(iter(metrics))
    groups = defaultdict(lambda: defaultdict(list))
    for rec in records:
        m = main_metric(experiment, rec)
        if m is not None:
            groups[(facet_key(rec), m[0])][rec.optimizer].append(rec)
    sweeps = {}
    for (facet, name), by_opt in groups.items():
        key = facet if len(metrics) == 1 else facet + (("metric", name),)
        sweeps[key] = {opt: lr_points(recs, name) for opt, recs in by_opt.items()}
    return metric, higher, sweeps


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


def lr_robustness_figure(records: Iterable, experiment: str, out_png: str | Path, max_cols: int = 5) -> Path:
    """Plot the final metric vs learning rate; runs that diverged (no finite metric) are drawn as x at the bottom
    (higher-is-better metrics) or top edge of their panel."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    from matplotlib.transforms import blended_transform_factory

    metric, higher, sweeps = lr_sweeps(records, experiment)
    facets = sorted((f for f in sweeps if any(len(p) >= 2 for p in sweeps[f].values())), key=facet_sort_key)
    if not facets:
        raise ValueError(f"no '{experiment}' runs sweep the learning rate")
    cols = min(max_cols, len(facets))
    rows = math.ceil(len(facets) / cols)
    apply_style()
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.6 * cols, 6.4), 3.0 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(facets) :]:
        ax.set_visible(False)
    handles = {}
    for ax, facet in zip(axes.flat, facets):
        values = [p.mean for pts in sweeps[facet].values() for p in pts if math.isfinite(p.mean)]
        log_y = not higher and values and min(values) > 0 and max(values) / min(values) > 10
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        for opt in sorted(sweeps[facet], key=optimizer_sort_key):
            style = optimizer_style(opt)
            pts = sweeps[facet][opt]
            ok = [p for p in pts if math.isfinite(p.mean)]
            (line,) = ax.plot([p.lr for p in ok], [p.mean for p in ok], color=style["color"], marker=style["marker"],
                              linestyle=style["linestyle"], label=style["label"])  # fmt: skip
            handles[style["label"]] = line
            spread = [p for p in ok if p.runs - p.diverged > 1]
            if spread:
                ax.vlines([p.lr for p in spread], [p.low for p in spread], [p.high for p in spread],
                          color=style["color"], alpha=0.5)  # fmt: skip
            bad = [p.lr for p in pts if not math.isfinite(p.mean)]
            if bad:
                ax.plot(bad, [0.97 if not higher else 0.03] * len(bad), transform=edge, linestyle="none",
                        marker="x", color=style["color"], markersize=7, clip_on=False)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_title(facet_title(facet), fontsize=9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {metric}" + ("" if higher else " (lower is better)"))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.16 / (rows + 1)))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 4 if cols == 1 else 7),
               bbox_to_anchor=(0.5, 1 - 0.07 / (rows + 1)), frameon=False)  # fmt: skip
    fig.suptitle(f"{experiment}: final {metric} vs learning rate (x: diverged)", y=1.0)
    return savefig(fig, out_png)
