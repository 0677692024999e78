"""Tables and figures of the long CPU runs (presets ``smollm2_long`` and ``minilm_long``; README "Long CPU runs").

Per experiment, :func:`long_table` gives one row per optimizer of the long sweeps: the runs present out of the
planned ones (the sweep files' grids: a partial grid says so), its best learning rate and the best value there
(mean ± std over the seeds that are done), the fair LR-robustness metric (:func:`main_figures.metrics.lr_robustness`:
the width in decades of the learning rates within the tolerance of its own best), whether the validation loss had
flattened at the best rate (:data:`FLAT_CRITERION`), and its diverged or failed runs. :func:`longer_table` puts the
runs trained three times longer (:data:`LONGER`) beside those of the long preset. :func:`loss_curves_figure` draws
the training loss of SGD vs scaled GD at their three rates over the whole run.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from main_figures.long_runs import EXPERIMENTS, sweep_params
from main_figures.metrics import (
    MAIN_METRICS, counts_as_result, format_width, lr_points, lr_robustness, metric_value, outcome_label, records_of,
    run_outcome, tolerance_for,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LongExperiment:
    experiment: str  # the record folder
    preset: str  # tags.preset of its long runs
    title: str
    valid_loss: str  # the evals key of the validation loss
    sweeps: tuple[str, ...]  # the long sweeps whose grids are planned (their optimizers are the table's rows)
    curves: str  # the sweep of SGD vs scaled GD


LONG = {
    "gpt2_e2e": LongExperiment("gpt2_e2e", "smollm2_long", "SmolLM2-135M on E2E, 100 steps (preset=smollm2_long)",
                               "valid_loss", ("long_lr", "long_lr_update", "long_peft_riemannian", "long_lora_rite",
                                              "long_curves"), "long_curves"),
    "glue": LongExperiment("glue", "minilm_long", "MiniLM-L6 on SST-2, 1000 steps (preset=minilm_long)",
                           "validation_loss", ("minilm_long_lr", "minilm_long_lr_update", "minilm_long_peft_riemannian",
                                               "minilm_long_lora_rite", "minilm_long_curves"), "minilm_long_curves"),
}  # fmt: skip
FLAT_TOLERANCE = 0.02
FLAT_CRITERION = (f"flattened: the run stopped improving, i.e. in the last quarter of the run (the evaluations after "
                  f"the last one at or before 75% of the steps) the validation loss reached no new low more than "
                  f"{FLAT_TOLERANCE:.0%} below its lowest value before, for every seed at the best rate. In "
                  f"brackets, the largest over those seeds of: low, how far the last quarter's lowest value lies below "
                  f"the lowest before it; ends, the fall from the evaluation at the start of the last quarter to the "
                  f"final one (a single evaluation at either end decides it)")  # fmt: skip


def row_label(record) -> str:
    """The table row of a record: the optimizer, with the update variant of scaled AdamW apart."""
    variant = record.hparams.get("variant")
    return record.optimizer + (f" ({variant})" if variant and variant != "gradient" else "")


def planned_runs(long: LongExperiment, root: Path = ROOT) -> dict[str, set[tuple[float, int]]]:
    """Row label -> the planned (lr, seed) pairs: the product of each long sweep's rates and seeds."""
    return sweep_grid(long.experiment, long.sweeps, root)


def sweep_grid(experiment: str, sweeps: Iterable[str], root: Path = ROOT) -> dict[str, set[tuple[float, int]]]:
    """Row label -> the (lr, seed) pairs that these sweeps of ``experiment`` (a record folder) run."""
    planned = defaultdict(set)
    for sweep in sweeps:
        params = sweep_params(root / EXPERIMENTS[experiment], sweep)
        variant = params.get("+optim.variant", [None])[0]
        for optimizer in params["optim"]:
            label = optimizer + (f" ({variant})" if variant and variant != "gradient" else "")
            planned[label] |= {(float(lr), int(seed)) for lr in params["optim.lr"] for seed in params["seed"]}
    return dict(planned)


def long_records(records: Iterable, long: LongExperiment) -> list:
    """The records of the long sweeps: the long preset, no tag but preset/task/variant (Table 1 has its own)."""
    allowed = {"preset", "task", "variant"}
    return [r for r in records if r.tags.get("preset") == long.preset and set(r.tags) <= allowed]


def _quarters(record, key: str) -> tuple[list[float], list[float]] | None:
    """The validation losses of a run before and in its last quarter (:data:`FLAT_CRITERION`): ``None`` without an
    evaluation on either side."""
    curve = {}
    for entry in record.evals:
        if entry.get(key) is not None and entry.get("step") is not None:
            curve[int(entry["step"])] = float(entry[key])  # the last evaluation of a step counts
    steps = sorted(curve)
    total = int(record.final_metrics.get("steps") or (steps[-1] if steps else 0))
    before = [s for s in steps if s <= 0.75 * total and s < steps[-1]]
    if not before:
        return None
    return [curve[s] for s in before], [curve[s] for s in steps if s > before[-1]]


def validation_drop(record, key: str) -> float:
    """The relative fall of the validation loss from the evaluation at the start of the run's last quarter to the
    final one (*ends* in :data:`FLAT_CRITERION`): ``nan`` without two evaluations to compare."""
    quarters = _quarters(record, key)
    if quarters is None:
        return float("nan")
    start, end = quarters[0][-1], quarters[1][-1]
    return (start - end) / start if start else float("nan")


def validation_new_low(record, key: str) -> float:
    """How far the lowest validation loss of the run's last quarter lies below the lowest before it, relative to the
    latter (*low* in :data:`FLAT_CRITERION`; negative when the last quarter stays above it): ``nan`` without an
    evaluation on either side."""
    quarters = _quarters(record, key)
    if quarters is None:
        return float("nan")
    before, last = min(quarters[0]), min(quarters[1])
    return (before - last) / before if before else float("nan")


def _flat_cell(records: list, key: str) -> str:
    """Whether every run's validation loss flattened (:data:`FLAT_CRITERION`), with the largest *low* and *ends* over
    the runs; ``-`` when a run has no curve to judge."""
    lows = [validation_new_low(r, key) for r in records]
    ends = [validation_drop(r, key) for r in records]
    if not records or any(not math.isfinite(v) for v in lows + ends):
        return "-"
    return f"{'yes' if max(lows) < FLAT_TOLERANCE else 'no'} (low {max(lows):+.1%}, ends {max(ends):+.1%})"


def _key(record) -> tuple[float, int]:
    return float(record.hparams["lr"]), int(record.seed)


def _fmt(value: float, scale: float) -> str:
    return f"{value * scale:.{2 if scale != 1 else 3}f}" if math.isfinite(value) else "-"


def _mean_std(values: list[float], scale: float) -> str:
    """``mean ± std (n)`` over seeds, ``value (1 seed)`` for one, ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{_fmt(values[0], scale)} (1 seed)"
    return f"{_fmt(statistics.mean(values), scale)} ± {_fmt(statistics.stdev(values), scale)} ({len(values)})"


def _main_metric(experiment: str, records: list) -> tuple[str, bool, float]:
    """The experiment's main metric among the records' final metrics, whether higher is better, and the scale the
    tables show it at (GLUE fractions as points)."""
    names, higher = MAIN_METRICS[experiment]
    metric = next((n for n in names if any(n in r.final_metrics for r in records)), names[0])
    return metric, higher, 100.0 if experiment == "glue" else 1.0


def long_table(results_dir: str | Path, experiment: str, root: Path = ROOT) -> str:
    """The Markdown table of one experiment's long runs (module docstring)."""
    long = LONG[experiment]
    planned = planned_runs(long, root)
    records = long_records(records_of(results_dir, experiment), long)
    metric, higher, scale = _main_metric(experiment, records)
    tolerance = tolerance_for(experiment, metric)
    by_label = defaultdict(list)
    for record in records:
        by_label[row_label(record)].append(record)
    unplanned = sorted(set(by_label) - set(planned))
    labels = sorted(planned) + unplanned
    points = {label: lr_points(by_label[label], metric) for label in labels if by_label[label]}
    robustness = lr_robustness(points, experiment, metric, higher, tolerance) if points else None
    present_total = sum(1 for r in records if counts_as_result(r) and _key(r) in planned.get(row_label(r), ()))
    planned_total = sum(len(p) for p in planned.values())
    state = "complete" if present_total == planned_total else "partial grid"
    lines = [f"### {long.title}", "",
             f"**{present_total} of the {planned_total} planned runs are present ({state}).** Metric: {'test' if experiment == 'gpt2_e2e' else 'dev'} {metric}"
             f"{' (x 100)' if scale != 1 else ''}, mean ± std over the seeds that are done at the best rate. "
             f"Robustness: width in decades of the tried rates within {tolerance.text} of the optimizer's own best "
             f"(≥: the interval reaches the end of the tried grid); running runs are in no value. Validation loss "
             f"{FLAT_CRITERION}.", "",
             "| optimizer | runs present / planned | rates tried | best lr | best (mean ± std, seeds) | "
             "robustness (decades) | validation loss flattened at best lr | diverged / failed |",
             "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        recs = by_label[label]
        wanted = planned.get(label, set())
        present = sum(1 for r in recs if counts_as_result(r) and _key(r) in wanted)
        bad = sorted((float(r.hparams["lr"]), r.seed, outcome_label(r)) for r in recs
                     if run_outcome(r) in ("diverged", "failed"))  # fmt: skip
        bad_cell = ", ".join(f"lr {lr:g} seed {seed}: {label_}" for lr, seed, label_ in bad) or "none"
        others = sum(1 for r in recs if run_outcome(r) in ("running", "interrupted"))
        if others:
            bad_cell += f"; {others} running / interrupted (in no value)"
        if not recs or robustness is None or not math.isfinite(robustness.row(label).best):
            lines.append(f"| {label} | {present} / {len(wanted)} | {len({lr for lr, _ in wanted})} planned | - | - | "
                         f"- | - | {bad_cell} |")  # fmt: skip
            continue
        row = robustness.row(label)
        at_best = [r for r in recs if float(r.hparams["lr"]) == row.best_lr and run_outcome(r) == "done"]
        best = _mean_std([metric_value(r, metric) for r in at_best], scale)
        done_lrs = {float(r.hparams["lr"]) for r in recs if counts_as_result(r)}
        tried = f"{len(done_lrs)} of {len({lr for lr, _ in wanted}) or len(done_lrs)}"
        lines.append(f"| {label} | {present} / {len(wanted)} | {tried} | {row.best_lr:g} | {best} | "
                     f"{format_width(row)} | {_flat_cell(at_best, long.valid_loss)} | {bad_cell} |")
    if unplanned:
        lines += ["", f"Rows not in the planned long sweeps: {', '.join(unplanned)}."]
    lines += _per_rate(points, planned, scale)
    return "\n".join(lines) + "\n"


def _per_rate(points: dict, planned: dict, scale: float) -> list[str]:
    """Mean over seeds at each planned rate of the optimizers that have runs (a blank: not run yet)."""
    rates = sorted({lr for label in points for lr, _ in planned.get(label, ())} | {
        p.lr for pts in points.values() for p in pts})
    if not points:
        return []
    lines = ["", "Per rate (mean over the seeds that are done; blank: not run yet):", "",
             "| optimizer | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for label, pts in points.items():
        by_lr = {p.lr: p for p in pts}
        cells = []
        for lr in rates:
            p = by_lr.get(lr)
            if p is None or not p.runs:
                cells.append("running" if p is not None and p.left_out else "")
            else:
                cells.append(_fmt(p.mean, scale) + (f" ({p.diverged} diverged)" if p.diverged else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class LongerRuns:
    """Runs of an experiment's long preset trained three times longer, at the best rates of its sweep."""

    title: str
    steps: tuple[int, int]  # optimizer steps of the long preset's runs and of these
    intro: str  # how they were trained, and what the metric is
    presets: dict[str, tuple[str, tuple[str, ...]]]  # preset -> (how, the table's column; the sweeps that plan it)


LONGER = {
    "gpt2_e2e": LongerRuns(
        "SmolLM2-135M on E2E, 300 steps (preset=smollm2_longer)", (100, 300),
        "The runs of smollm2_long trained three times longer (300 steps of batch 4, still one pass over the dev "
        "pairs, 10% warm-up, then the learning rate decaying linearly to 0), beside the 100-step runs of the same "
        "optimizer, rate and seeds. Test BLEU of the state with the best validation loss (as in the 100-step runs)",
        {"smollm2_longer": ("1,200 pairs, one pass", ("long_longer",))}),
    "glue": LongerRuns(
        "MiniLM-L6 on SST-2, 3000 steps (preset=minilm_longer, preset=minilm_three_epochs)", (1000, 3000),
        "The runs of minilm_long trained three times longer (3,000 steps, the learning rate decaying linearly to 0 "
        "over them) on three times the training data or for three epochs of the same data, beside the 1,000-step "
        "runs of the same optimizer, rate and seeds. Dev accuracy (x 100) at the end",
        {"minilm_longer": ("one epoch of 24,000 sentences", ("minilm_longer",)),
         "minilm_three_epochs": ("three epochs of the 8,000 sentences",
                                 ("minilm_three_epochs", "minilm_three_epochs_update",
                                  "minilm_three_epochs_loraplus"))}),
}  # fmt: skip


def longer_table(results_dir: str | Path, experiment: str, root: Path = ROOT) -> str:
    """The runs of :data:`LONGER` ``[experiment]``, one row per preset, optimizer and rate, beside the runs of the
    long preset with the same optimizer, rate and seeds: the final metric of both (mean ± std over the seeds done in
    the longer preset) and whether the validation loss flattened over the last quarter of every seed's run
    (:data:`FLAT_CRITERION`); the best rate of each optimizer in a preset in bold. An empty string without such a
    run."""
    longer_runs, long = LONGER[experiment], LONG[experiment]
    records = records_of(results_dir, experiment)
    longer = [r for r in records
              if r.tags.get("preset") in longer_runs.presets and set(r.tags) <= {"preset", "task", "variant"}]
    if not longer:
        return ""
    shorter = {(row_label(r), *_key(r)): r for r in long_records(records, long) if run_outcome(r) == "done"}
    metric, _, scale = _main_metric(experiment, records)
    groups = defaultdict(list)
    for record in longer:
        groups[(record.tags["preset"], row_label(record), float(record.hparams["lr"]))].append(record)
    counts = []
    for preset, (_, sweeps) in longer_runs.presets.items():
        wanted = {(label, lr, seed) for label, pairs in sweep_grid(experiment, sweeps, root).items()
                  for lr, seed in pairs}
        present = {(row_label(r), *_key(r)) for r in longer if r.tags["preset"] == preset and counts_as_result(r)}
        counts.append(f"{len(present & wanted)} of the {len(wanted)} planned runs of preset={preset}")

    def mean(group: list) -> float:
        done = [metric_value(r, metric) for r in group if run_outcome(r) == "done"]
        return statistics.mean(done) if done else float("nan")

    best = {}
    for (preset, label, lr), group in groups.items():
        if math.isfinite(mean(group)) and mean(group) > best.get((preset, label), (float("-inf"),))[0]:
            best[(preset, label)] = (mean(group), lr)
    short_steps, long_steps = longer_runs.steps
    what = f"{'test' if experiment == 'gpt2_e2e' else 'dev'} {metric}"
    lines = [f"### {longer_runs.title}", "",
             f"{longer_runs.intro}, mean ± std over the seeds done at {long_steps} steps (the {short_steps}-step "
             f"column over the same seeds); in bold, each optimizer's best rate in a preset. Flattened: the rule "
             f"of the tables above, for every seed in the row. Present: {'; '.join(counts)}.", "",
             f"| optimizer | lr | {long_steps} steps of | seeds | {what}, {short_steps} steps | {what}, {long_steps} "
             f"steps | flattened, {short_steps} steps | flattened, {long_steps} steps |",
             "|---|---|---|---|---|---|---|---|"]
    order = list(longer_runs.presets)
    for preset, label, lr in sorted(groups, key=lambda key: (order.index(key[0]), key[1], key[2])):
        group = sorted(groups[(preset, label, lr)], key=lambda r: r.seed)
        done = [r for r in group if run_outcome(r) == "done"]
        short = [shorter[(label, lr, r.seed)] for r in done if (label, lr, r.seed) in shorter]
        long_value = _mean_std([metric_value(r, metric) for r in done], scale)
        if done and best.get((preset, label), (None, None))[1] == lr:
            long_value = f"**{long_value}**"
        others = [f"seed {r.seed}: {outcome_label(r)}" for r in group if run_outcome(r) != "done"]
        long_value = ", ".join(([long_value] if done else []) + others)
        seeds = ", ".join(str(r.seed) for r in group)
        short_value = _mean_std([metric_value(r, metric) for r in short], scale) if short else \
            ("not run" if done else "-")
        if short and len(short) < len(done):
            short_value += f" ({len(done) - len(short)} not run)"
        lines.append(f"| {label} | {lr:g} | {longer_runs.presets[preset][0]} | {seeds} | {short_value} | "
                     f"{long_value} | {_flat_cell(short, long.valid_loss) if short else '-'} | "
                     f"{_flat_cell(done, long.valid_loss) if done else '-'} |")
    return "\n".join(lines) + "\n"


def long_tables(results_dir: str | Path, root: Path = ROOT) -> str:
    """Both experiments' long tables and their runs trained three times longer, one Markdown document."""
    parts = [long_table(results_dir, e, root) for e in LONG] + [longer_table(results_dir, e, root) for e in LONGER]
    return "## Long CPU runs\n\n" + "\n".join(part for part in parts if part)


def loss_curves_figure(results_dir: str | Path, experiment: str, out_png: str | Path) -> Path:
    """Training loss per logged step of SGD vs scaled GD at the rates of the long curves sweep, over the whole run;
    a LookupError naming the command when no such run is present."""
    import matplotlib.pyplot as plt

    from main_figures.style import apply_style, optimizer_style, savefig

    long = LONG[experiment]
    params = sweep_params(ROOT / EXPERIMENTS[experiment], long.curves)
    lrs = [float(lr) for lr in params["optim.lr"]]
    records = [r for r in long_records(records_of(results_dir, experiment), long)
               if r.optimizer in params["optim"] and float(r.hparams["lr"]) in lrs and r.steps]
    if not records:
        raise LookupError(f"no {experiment} long SGD / scaled GD runs; run: python "
                          f"{EXPERIMENTS[experiment]}/train.py -m sweep={long.curves} skip_finished=true resume=auto")
    apply_style()
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 3.4), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for record in sorted(records, key=lambda r: r.optimizer):
            if float(record.hparams["lr"]) != lr:
                continue
            style = optimizer_style(record.optimizer)
            steps = [s["step"] for s in record.steps if s.get("loss") is not None]
            losses = [s["loss"] for s in record.steps if s.get("loss") is not None]
            tag = "" if run_outcome(record) == "done" else f" ({outcome_label(record)})"
            ax.plot(steps, losses, color=style["color"], linestyle=style["linestyle"],
                    label=f"{style['label']} seed {record.seed}{tag}")
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    fig.suptitle(f"{long.title}: SGD vs scaled GD", y=1.03)
    return savefig(fig, out_png)
