"""Markdown tables of the GLUE runs, built only from the records in results/glue/*.json.

    python Mistral-7B/make_table.py                                 # print Table 2, the LR sweep, the reg sweep
    python Mistral-7B/make_table.py --readme Mistral-7B/README.md   # also rewrite the README's generated block

`make_table(results_dir)` is Table 2 (optimizers x tasks + average; main_figures imports it), one table per
preset: each cell is the task's dev metric x 100 (Matthews for CoLA, Pearson for STS-B, accuracy otherwise; MNLI
matched), mean ± std over seeds at the optimizer's tuned (lr, reg): the setting run with the most seeds, ties
(e.g. one seed per LR) broken by the best score. `make_sweep_table` is the metric per optimizer and learning
rate with each optimizer's learning-rate robustness (best, and the width in decades of the interval of learning
rates within 1 point of it; `main_figures/metrics.py`) and the step time; `make_reg_table` the metric per `reg` and
learning rate of one optimizer. Diverged and failed runs are never counted as values.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

from glue_metrics import GLUE_TASKS, primary_metric  # noqa: E402

from harness import REPO_ROOT, load_records  # noqa: E402
from main_figures.metrics import GRID_NOTE, format_width, lr_points, lr_robustness, outcome_label  # noqa: E402
from main_figures.metrics import robustness_verdict, run_outcome, tolerance_for  # noqa: E402

EXPERIMENT = "glue"
OPTIMIZERS = ("sgd", "scaled_gd", "adamw", "scaled_adamw", "peft_riemannian", "loraplus", "lora_rite")
SENSITIVITY_PRESETS = ("minilm_sst2_reg", "minilm_sst2_lora_scale")  # reg and LoRA-scale sweeps: not in Table 2
BEGIN, END = "<!-- make_table.py: begin -->", "<!-- make_table.py: end -->"
RESULTS = REPO_ROOT / "results"


def score(record) -> float | None:
    """The record's Table-2 metric x 100 (None when it was not measured or is not finite, or when the run did not
    finish: diverged and failed runs never count as values, even when they were evaluated after stopping)."""
    if run_outcome(record) != "done":
        return None
    value = record.final_metrics.get(primary_metric(record.tags["task"]))
    return None if value is None or value != value else 100.0 * value


def _records(results_dir, presets=None, task=None):
    """The GLUE records (a file that is not a run record is skipped with a warning naming it)."""
    return [r for r in load_records(results_dir, EXPERIMENT, on_invalid="warn")
            if (presets is None or r.tags.get("preset") in presets) and (task is None or r.tags["task"] == task)]


def _group(records, row, column) -> dict:
    """{row(record): {column(record): [records]}}"""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[row(r)][column(r)].append(r)
    return out


def _order(optimizer: str) -> tuple:
    return (OPTIMIZERS.index(optimizer) if optimizer in OPTIMIZERS else len(OPTIMIZERS), optimizer)


def _mean_std(records) -> str:
    """Mean ± std of the scores of the runs that are done; the others are counted after it (``+1 diverged``), or
    shown alone (``diverged@<step>``, ``failed``, ``running``) when no run is done."""
    values = [s for s in map(score, records) if s is not None]
    others = [r for r in records if run_outcome(r) != "done"]
    if not values:
        labels = sorted({outcome_label(r) for r in others})
        return " / ".join(labels) + (f" ({len(others)} runs)" if len(others) > 1 else "") if labels else "–"
    text = f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")
    counts = defaultdict(int)
    for r in others:
        counts[run_outcome(r)] += 1
    return text + "".join(f" (+{n} {outcome})" for outcome, n in sorted(counts.items()))


def _tuned(by_config: dict) -> tuple[tuple, list]:
    """The (lr, reg) run with the most seeds, ties broken by the best seed-mean score; and its records."""
    def key(config):
        values = [s for s in map(score, by_config[config]) if s is not None]
        return len(values), statistics.mean(values) if values else float("-inf")

    config = max(by_config, key=key)
    return config, by_config[config]


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _row_name(record) -> str:
    """The optimizer, with scaled AdamW's update variant a row of its own (the gradient variant is the default)."""
    variant = record.hparams.get("variant", "gradient")
    return record.optimizer + ("" if variant == "gradient" else f" ({variant})")


def make_table(results_dir: str | Path = RESULTS, preset: str | None = None) -> str:
    """Table 2: optimizers x tasks + average, one markdown table per preset (cell: score @ tuned lr, reg)."""
    records = _records(results_dir, None if preset is None else (preset,))
    by_preset = _group([r for r in records if preset or r.tags.get("preset") not in SENSITIVITY_PRESETS],
                       lambda r: r.tags.get("preset", "?"), _row_name)
    blocks = []
    for name, by_optim in sorted(by_preset.items()):
        tasks = [t for t in GLUE_TASKS if any(r.tags["task"] == t for rs in by_optim.values() for r in rs)]
        rows = []
        for optim in sorted(by_optim, key=_order):
            by_task = _group(by_optim[optim], lambda r: r.tags["task"], lambda r: (r.hparams["lr"], r.hparams.get("reg")))
            cells, means = [], []
            for task in tasks:
                if task not in by_task:
                    cells.append("–")
                    continue
                (lr, reg), runs = _tuned(by_task[task])
                cells.append(_mean_std(runs) + f" @ {lr:g}" + ("" if reg is None else f", reg {reg:g}"))
                values = [s for s in map(score, runs) if s is not None]
                means.append(statistics.mean(values) if values else None)
            complete = len(means) == len(tasks) and None not in means
            rows.append([optim, *cells, f"{statistics.mean(means):.1f}" if complete else "–"])
        title = f"**{name}**: dev metric x 100, mean ± std over seeds @ tuned lr (, reg)"
        blocks.append(_table(title, ["optimizer", *tasks, "avg"], rows))
    return "\n".join(blocks)


def make_sweep_table(results_dir: str | Path = RESULTS, preset: str = "minilm_sst2", task: str = "sst2") -> str:
    """Metric x 100 per optimizer (rows) and learning rate (columns), mean ± std where several seeds ran; a
    diverged, failed, running or interrupted run is never a value (the cell counts it, or shows it alone); then
    each optimizer's best and the width in decades of its learning-rate interval within the tolerance of that best
    (``main_figures.metrics.lr_robustness``), and the step time: the smallest of the runs' median step times (timing noise
    only ever adds time). The "most robust" verdict follows the table."""
    records = _records(results_dir, (preset,), task)
    by_optim = _group(records, lambda r: r.optimizer, lambda r: r.hparams["lr"])
    lrs = sorted({lr for by_lr in by_optim.values() for lr in by_lr})
    metric = primary_metric(task)
    tol = tolerance_for(EXPERIMENT, metric)
    rob = None
    if tol is not None and by_optim:
        points = {o: lr_points([r for rs in by_optim[o].values() for r in rs], metric)
                  for o in sorted(by_optim, key=_order)}
        rob = lr_robustness(points, EXPERIMENT, metric, higher=True)
    rows = []
    for optim in sorted(by_optim, key=_order):
        regs = {r.hparams.get("reg") for rs in by_optim[optim].values() for r in rs}
        if len(regs) > 1:
            raise ValueError(f"{preset}: {optim} was run with several reg values {sorted(regs)}; "
                             "record reg sweeps under their own preset tag (see conf/sweep/minilm_reg.yaml)")
        times = [r.step_time_s for rs in by_optim[optim].values() for r in rs if r.step_time_s]
        extra = []
        if rob is not None:
            row = rob.row(optim)
            extra = [f"{100 * row.best:.1f}" if row.best == row.best else "–", format_width(row)]
        rows.append([optim, *(_mean_std(by_optim[optim][lr]) if lr in by_optim[optim] else "–" for lr in lrs),
                     *extra, f"{1000 * min(times):.0f}" if times else "–"])
    title = f"**{preset}**, {task}: dev {metric} x 100 by learning rate"
    robust_cols = ["best", f"width (decades) within {tol.text}"] if rob is not None else []
    table = _table(title, ["optimizer", *(f"lr {lr:g}" for lr in lrs), *robust_cols, "step time (ms)"], rows)
    if rob is None:
        return table
    verdict = robustness_verdict(rob, value=lambda v: f"{100 * v:.1f}")
    return table + f"\nRobustness: {GRID_NOTE}; tolerance {tol.text}.\n\n" + "\n".join(verdict) + "\n"


def make_reg_table(results_dir: str | Path = RESULTS, optimizer: str = "scaled_adamw",
                   presets=("minilm_sst2", "minilm_sst2_reg"), task: str = "sst2", seed: int = 42) -> str:
    """Metric x 100 of `optimizer` per reg (rows) and learning rate (columns), one seed, at the learning rates
    of the reg sweep."""
    records = [r for r in _records(results_dir, presets, task) if r.optimizer == optimizer and r.seed == seed]
    by_reg = _group(records, lambda r: r.hparams["reg"], lambda r: r.hparams["lr"])
    swept = {r.hparams["lr"] for r in records if r.tags.get("preset") in SENSITIVITY_PRESETS}
    lrs = sorted(swept or {lr for by_lr in by_reg.values() for lr in by_lr})
    rows = [[f"{reg:g}", *(_mean_std(by_reg[reg][lr]) if lr in by_reg[reg] else "–" for lr in lrs)]
            for reg in sorted(by_reg)]
    title = f"**{optimizer}** on {task} (seed {seed}): dev {primary_metric(task)} x 100 by reg and learning rate"
    return _table(title, ["reg", *(f"lr {lr:g}" for lr in lrs)], rows)


def write_readme(readme: Path, text: str) -> None:
    """Replace the block between the BEGIN / END markers of `readme` with `text`."""
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise ValueError(f"{readme} has no '{BEGIN}' ... '{END}' block to fill")
    head, rest = content.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (holding glue/*.json)")
    parser.add_argument("--readme", type=Path, help="also write the tables into this README's generated block")
    args = parser.parse_args(argv)
    text = "\n".join([make_table(args.results), make_sweep_table(args.results), make_reg_table(args.results)])
    print(text)
    if args.readme:
        write_readme(args.readme, text)
    return text


if __name__ == "__main__":
    main()
