"""The peers side by side: every optimizer run on the two small real presets across a learning-rate grid, with
its final metric at the best learning rate, the width in decades of the learning-rate interval over which it stays
within the experiment's tolerance of that best (``metrics.lr_robustness``), and the median wall-clock time of a
step. The verdict lines under each table are generated from the same numbers, and say plainly which method wins."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from main_figures.metrics import lr_points, main_metric, records_of
from main_figures.metrics import GRID_NOTE, OptimizerRobustness, Robustness, format_width, lr_robustness
from main_figures.metrics import robustness_verdict, run_outcome
from main_figures.style import optimizer_label, optimizer_sort_key

__all__ = ["PEER_PRESETS", "PeerRow", "peer_rows", "peers_table", "has_peer_records"]

# (experiment, preset tag, description)
PEER_PRESETS = (
    ("gpt2_e2e", "smollm2_cpu", "SmolLM2-135M + LoRA on E2E (CPU preset)"),
    ("glue", "minilm_sst2", "MiniLM-L6 + LoRA on SST-2 (CPU preset)"),
)


@dataclass
class PeerRow:
    optimizer: str
    best_lr: float
    best: float  # mean over seeds at the best learning rate (nan: no rate where every run finished)
    robustness: OptimizerRobustness  # the interval within the tolerance of best, and its width in decades
    lrs: list[float]
    diverged_lrs: int  # learning rates with a diverged or failed run
    seeds: int  # most runs at one learning rate
    step_time_s: float  # median over the optimizer's runs of their median step time (nan: not recorded)
    left_out: int = 0  # running / interrupted runs (in no value)


def _preset_records(results_dir: str | Path, experiment: str, preset: str) -> list:
    """The preset's scored runs (and its diverged, failed, running or interrupted ones, scored or not); only those
    of its LR sweep (tag ``sweep: lr``) when it has one, so that every optimizer is compared on the same grid."""
    records = [
        r for r in records_of(results_dir, experiment)
        if r.tags.get("preset") == preset and (main_metric(experiment, r) is not None or run_outcome(r) != "done")
    ]  # fmt: skip
    swept = [r for r in records if r.tags.get("sweep") == "lr"]
    return swept or records


def has_peer_records(results_dir: str | Path) -> bool:
    return any(_preset_records(results_dir, e, p) for e, p, _ in PEER_PRESETS)


def peer_rows(records: list, experiment: str) -> tuple[str, bool, list[PeerRow]]:
    """(metric, higher_is_better, one row per optimizer in the paper's order) for one preset's records."""
    metric, higher, rows, _ = _peer_rows(records, experiment)
    return metric, higher, rows


def _peer_rows(records: list, experiment: str) -> tuple[str, bool, list[PeerRow], Robustness]:
    metrics = {main_metric(experiment, r) for r in records} - {None}
    if len(metrics) != 1:
        raise ValueError(f"'{experiment}' records of one preset must share one main metric, found {sorted(metrics)}")
    metric, higher = next(iter(metrics))
    by_opt = defaultdict(list)
    for rec in records:
        by_opt[rec.optimizer].append(rec)
    opts = sorted(by_opt, key=optimizer_sort_key)
    points = {opt: lr_points(by_opt[opt], metric) for opt in opts}
    rob = lr_robustness(points, experiment, metric, higher)
    rows = []
    for opt in opts:
        r = rob.row(opt)
        times = [rec.step_time_s for rec in by_opt[opt] if rec.step_time_s is not None]
        rows.append(PeerRow(
            optimizer=opt, best_lr=r.best_lr, best=r.best, robustness=r, lrs=[p.lr for p in points[opt]],
            diverged_lrs=sum(1 for p in points[opt] if p.diverged), seeds=max(p.runs for p in points[opt]),
            step_time_s=statistics.median(times) if times else float("nan"), left_out=r.left_out,
        ))  # fmt: skip
    return metric, higher, rows, rob


def _num(value: float, fmt: str = ".2f") -> str:
    return format(value, fmt) if math.isfinite(value) else "-"


def _digits(rows: list[PeerRow]) -> str:
    """Three decimals for metrics that are fractions (accuracy 0.912), two otherwise (BLEU 68.21)."""
    values = [abs(r.best) for r in rows if math.isfinite(r.best)]
    return ".3f" if values and max(values) <= 1.0 else ".2f"


def _verdict(metric: str, higher: bool, rows: list[PeerRow], rob: Robustness) -> list[str]:
    ranked = sorted((r for r in rows if math.isfinite(r.best)), key=lambda r: r.best, reverse=higher)
    if not ranked:
        return ["No optimizer finished a learning rate with a finite value; no winner."]
    f = _digits(rows)
    win = ranked[0]
    out = [f"- Best final {metric}: **{optimizer_label(win.optimizer)}** ({win.best:{f}} at lr {win.best_lr:g})."]
    ours = next((r for r in rows if r.optimizer == "scaled_adamw"), None)
    if ours is not None and math.isfinite(ours.best) and win.optimizer != "scaled_adamw":
        out.append(
            f"- {optimizer_label(win.optimizer)} beats scaled AdamW ({ours.best:{f}}) by "
            f"{abs(win.best - ours.best):{f}} {metric}; scaled AdamW ranks {ranked.index(ours) + 1} of {len(ranked)}."
        )
    elif ours is not None and len(ranked) > 1:
        out.append(f"- Runner-up: {optimizer_label(ranked[1].optimizer)} ({ranked[1].best:{f}}).")
    out += robustness_verdict(rob, optimizer_label)
    timed = [r for r in rows if math.isfinite(r.step_time_s)]
    if timed:
        fast = min(timed, key=lambda r: r.step_time_s)
        out.append(f"- Fastest step: {optimizer_label(fast.optimizer)} ({fast.step_time_s * 1e3:.0f} ms).")
    if max(r.seeds for r in rows) == 1:
        out.append("- One seed per learning rate: small differences are within run-to-run noise.")
    return out


def _interval(r: OptimizerRobustness) -> str:
    if not math.isfinite(r.width):
        return "-"
    return f"{r.lr_low:g}" if r.lr_low == r.lr_high else f"{r.lr_low:g} … {r.lr_high:g}"


def peers_table(results_dir: str | Path) -> str:
    """Markdown tables (one per preset with records) of the optimizers side by side, each with its verdict."""
    parts = []
    for experiment, preset, description in PEER_PRESETS:
        records = _preset_records(results_dir, experiment, preset)
        if not records:
            parts += [f"### {description}: `{experiment}`, preset `{preset}`", "", "_No records yet._", ""]
            continue
        metric, higher, rows, rob = _peer_rows(records, experiment)
        tol = rob.tolerance.text
        parts += [
            f"### {description}: `{experiment}`, preset `{preset}`",
            "",
            f"| optimizer | best lr | {metric} at best lr | lrs within {tol} of own best | width (decades) "
            "| lrs tried | lrs with a diverged / failed run | median step time (ms) |",
            "|---|---:|---:|---|---:|---|---:|---:|",
        ]
        f = _digits(rows)
        for r in rows:
            lrs = f"{min(r.lrs):g} … {max(r.lrs):g} ({len(r.lrs)})" if len(r.lrs) > 1 else f"{r.lrs[0]:g}"
            parts.append(
                f"| {optimizer_label(r.optimizer)} | {_num(r.best_lr, 'g')} | {_num(r.best, f)} "
                f"| {_interval(r.robustness)} | {format_width(r.robustness)} | {lrs} | {r.diverged_lrs} "
                f"| {_num(r.step_time_s * 1e3, '.0f')} |"
            )
        parts += ["", f"Robustness: {GRID_NOTE}; tolerance {tol}.", "", *_verdict(metric, higher, rows, rob)]
        left = [r for r in rows if r.left_out]
        if left:
            parts.append("- Left out of every value (still running or interrupted): "
                         + ", ".join(f"{optimizer_label(r.optimizer)} ({r.left_out} run(s))" for r in left) + ".")
        parts.append("")
    if not any(_preset_records(results_dir, e, p) for e, p, _ in PEER_PRESETS):
        raise ValueError(f"no records of the peer presets {[p for _, p, _ in PEER_PRESETS]} in '{results_dir}'")
    return "\n".join(parts)
