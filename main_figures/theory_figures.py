"""Figure and table of the theory experiment, from its records (``results/theory/*.json``).

Selection rule (the same for every optimizer, never tuned per case): for each (conditioning, optimizer, kappa) the
reported run is the best step size of the grid -- the fewest iterations to the tolerance; when no step size reaches
it, the lowest final relative loss, shown as ">= max_iters" (censored). Diverged and failed runs
(``metrics.run_outcome``) are never the best unless every step size diverged or failed; running and interrupted runs
are left out.

Sensitivity. The runs of the sensitivity study (tag ``perturbation``: the whole grid again from starts perturbed
at float64's rounding, ``theory.run_sensitivity``) never compete with the spectral start's; the same rule selects
the best step size of each perturbed start (:func:`select_best` with ``perturbation``), and the table reports
beside each cell what those gave (:func:`spread`), marking the cell **sensitive** when one of them is more than
:data:`SENSITIVE_SPREAD` away from the cell's iterations or differs in whether the tolerance is reached: such a
cell is one machine's answer, which another CPU's last-bit differences can change.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from main_figures.style import apply_style, optimizer_label, optimizer_sort_key, optimizer_style, savefig
from main_figures.metrics import counts_as_result, run_outcome

__all__ = ["Best", "select_best", "spread", "theory_table", "theory_figure", "CONDITIONING_TITLES", "SENSITIVE_SPREAD"]

SENSITIVE_SPREAD = 0.05  # perturbed starts within 5% of the cell's iterations: the cell does not depend on the CPU

CONDITIONING_TITLES = {
    "target": "ill-conditioned target update dW* (theory's setting)",
    "data": "ill-conditioned inputs X (contrast)",
}


@dataclass
class Best:
    """The run kept for one (conditioning, optimizer, kappa) and what it achieved."""

    conditioning: str
    optimizer: str
    kappa: float
    lr: float
    iterations: int  # to the tolerance, or the iterations run when it was not reached
    reached_tol: bool
    relative_loss: float  # final (nan when diverged)
    record: object  # the harness.RunRecord


def _label(optimizer: str) -> str:
    """Full-batch SGD is plain GD here."""
    return "GD" if optimizer == "sgd" else optimizer_label(optimizer)


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _rank(record) -> tuple:
    m = record.final_metrics
    final = _float(m.get("relative_loss"))
    if m.get("reached_tol") and run_outcome(record) == "done":
        return (0, int(m["iters_to_tol"]), final)
    if run_outcome(record) != "done" or not math.isfinite(final):  # diverged or failed: never a value
        return (2, 0, 0.0)
    return (1, final, 0.0)


def select_best(records: Iterable, perturbation: int = 0) -> dict[tuple[str, str, float], Best]:
    """Best step size per (conditioning, optimizer, kappa) by the rule of the module docstring, among the runs
    from the spectral start (``perturbation = 0``) or from the perturbed start of that seed."""
    groups = defaultdict(list)
    for rec in records:
        if not counts_as_result(rec) or int(rec.tags.get("perturbation", 0)) != perturbation:
            continue
        if "kappa" not in rec.tags:
            raise ValueError(f"theory record '{rec.run_name}' has no 'kappa' tag (tags: {rec.tags})")
        groups[(rec.tags.get("conditioning", "target"), rec.optimizer, float(rec.tags["kappa"]))].append(rec)
    out = {}
    for key, runs in groups.items():
        rec = min(runs, key=_rank)
        m = rec.final_metrics
        out[key] = Best(
            *key, lr=float(rec.hparams["lr"]), iterations=int(m.get("iterations", 0)),
            reached_tol=bool(m.get("reached_tol")) and run_outcome(rec) == "done",
            relative_loss=_float(m.get("relative_loss")) if run_outcome(rec) == "done" else float("nan"), record=rec,
        )  # fmt: skip
    return out


def spread(best: Best, records: Iterable) -> tuple[list[tuple[int, bool]], bool] | None:
    """What the perturbed starts gave for ``best``'s cell: (iterations, reached the tolerance) of the best step
    size of each, and whether the cell is sensitive (module docstring); ``None`` when there are none."""
    records = list(records)
    key = (best.conditioning, best.optimizer, best.kappa)
    seeds = sorted({int(r.tags["perturbation"]) for r in records if "perturbation" in r.tags})
    runs = [(b.iterations, b.reached_tol) for b in (select_best(records, p).get(key) for p in seeds) if b]
    if not runs:
        return None
    sensitive = any(reached != best.reached_tol or abs(iters - best.iterations) > SENSITIVE_SPREAD * best.iterations
                    for iters, reached in runs)  # fmt: skip
    return sorted(runs), sensitive


def _spread_text(runs: list[tuple[int, bool]], sensitive: bool) -> str:
    low, high = runs[0][0], runs[-1][0]
    missed = sum(not reached for _, reached in runs)
    span = f"{low}" if low == high else f"{low}-{high}"
    text = f"{len(runs)} perturbed: {span}" + (f", {missed} not reached" if missed else "")
    return f"**sensitive** ({text})" if sensitive else f"({text})"


def _cell(best: Best | None, records: list | None = None) -> str:
    if best is None:
        return "-"
    found = spread(best, records or [])
    tail = f" {_spread_text(*found)}" if found else ""
    if best.reached_tol:
        return f"{best.iterations} (lr {best.lr:g}){tail}"
    if not math.isfinite(best.relative_loss):
        return "diverged"
    return f">= {best.iterations} (lr {best.lr:g}, reached {best.relative_loss:.1e}){tail}"


def theory_table(records: Iterable) -> str:
    """Markdown: iterations to the tolerance per kappa (rows) and optimizer (columns), one table per study, each
    cell with the spread of its sensitivity runs when they exist."""
    records = list(records)
    best = select_best(records)
    if not best:
        raise ValueError("no theory records to tabulate")
    lines = []
    for conditioning in sorted({k[0] for k in best}, key=lambda c: list(CONDITIONING_TITLES).index(c)):
        opts = sorted({k[1] for k in best if k[0] == conditioning}, key=optimizer_sort_key)
        kappas = sorted({k[2] for k in best if k[0] == conditioning})
        any_rec = next(b.record for k, b in best.items() if k[0] == conditioning)
        tol = any_rec.final_metrics.get("tol")
        lines += [
            f"**{CONDITIONING_TITLES.get(conditioning, conditioning)}**: iterations to relative loss {tol:g} "
            "(best step size of the grid)",
            "",
            "| kappa | " + " | ".join(_label(o) for o in opts) + " |",
            "|---:|" + "---:|" * len(opts),
        ]
        for kappa in kappas:
            lines.append(f"| {kappa:g} | " + " | ".join(_cell(best.get((conditioning, o, kappa)), records)
                                                          for o in opts) + " |")  # fmt: skip
        lines.append("")
    if any("perturbation" in r.tags for r in records):
        lines += [f"In brackets: the iterations of the best step size when the whole grid is run again from starts "
                  f"perturbed by a relative 1e-12 (float64's rounding, the size of another CPU's last-bit "
                  f"differences). **sensitive**: one of them differs by more than {SENSITIVE_SPREAD:.0%} or in "
                  f"whether the tolerance is reached; such a cell is one machine's answer.", ""]  # fmt: skip
    return "\n".join(lines)


def _curve(record) -> tuple[list[int], list[float]]:
    steps = [s for s in record.steps if s.get("rel_loss") is not None]
    return [s["step"] for s in steps], [s["rel_loss"] for s in steps]


def theory_figure(records: Iterable, out_png: str | Path, curve_kappas: tuple[float, ...] = (1, 100, 10000)) -> Path:
    """Left: relative loss vs iteration of GD and scaled GD at several kappa (ill-conditioned target);
    middle: iterations to the tolerance vs kappa for every optimizer (log-log; hollow markers: not reached by the
    cap); right: the same for ill-conditioned inputs when those records exist."""
    import matplotlib.pyplot as plt

    best = select_best(list(records))
    if not best:
        raise ValueError("no theory records to plot")
    studies = [c for c in CONDITIONING_TITLES if any(k[0] == c for k in best)]
    apply_style()
    fig, axes = plt.subplots(1, 1 + len(studies), figsize=(4.6 * (1 + len(studies)), 3.9))

    ax = axes[0]
    kappas = sorted({k[2] for k in best if k[0] == studies[0]})
    shown = [k for k in kappas if k in curve_kappas] or kappas[:: max(1, len(kappas) // 3)]
    shades = {k: 0.45 + 0.55 * i / max(1, len(shown) - 1) for i, k in enumerate(shown)}
    curve_opts = [o for o in ("sgd", "scaled_gd") if any(k[:2] == (studies[0], o) for k in best)]
    curve_opts = curve_opts or sorted({k[1] for k in best if k[0] == studies[0]}, key=optimizer_sort_key)[:2]
    for opt in curve_opts:
        style = optimizer_style(opt)
        for kappa in shown:
            b = best.get((studies[0], opt, kappa))
            if b is not None:
                x, y = _curve(b.record)
                ax.semilogy(x, y, color=style["color"], linestyle=style["linestyle"], alpha=shades[kappa],
                            label=f"{_label(opt)}, κ={kappa:g}")  # fmt: skip
    tol = best[next(iter(best))].record.final_metrics.get("tol")
    if tol:
        ax.axhline(tol, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative loss  L(W0+BA) / L(W0)")
    ax.set_title(f"loss curves (best step size), {studies[0]} ill-conditioning")
    ax.legend(loc="upper right", ncol=1)

    for ax, conditioning in zip(axes[1:], studies):
        opts = sorted({k[1] for k in best if k[0] == conditioning}, key=optimizer_sort_key)
        cap = None
        for opt in opts:
            style = optimizer_style(opt)
            pts = sorted((k[2], b) for k, b in best.items() if k[:2] == (conditioning, opt))
            xs = [k for k, _ in pts]
            ys = [b.iterations for _, b in pts]
            ax.loglog(xs, ys, color=style["color"], linestyle=style["linestyle"], label=_label(opt))
            for (k, b), y in zip(pts, ys):
                face = style["color"] if b.reached_tol else "white"
                ax.plot([k], [y], marker=style["marker"], markerfacecolor=face, markeredgecolor=style["color"])
                if not b.reached_tol:
                    cap = b.record.final_metrics.get("max_iters", y)
        if cap:
            ax.axhline(cap, color="grey", linewidth=0.8, linestyle=":")
            ax.annotate("iteration cap\n(hollow: not reached)", (1.0, cap), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", ha="right", va="top", xytext=(0, -3), textcoords="offset points")
            ax.set_ylim(top=cap * 1.6)
        ax.set_xlabel("condition number κ")
        ax.set_ylabel(f"iterations to relative loss {tol:g}")
        ax.set_title(CONDITIONING_TITLES.get(conditioning, conditioning))
        ax.legend(loc="upper left", fontsize=7.5)
    fig.suptitle("Fine-tuning a convex two-layer ReLU network with LoRA: iterations vs condition number", y=1.02)
    fig.tight_layout()
    return savefig(fig, out_png)
