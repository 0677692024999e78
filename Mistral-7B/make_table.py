"""Markdown tables of the GLUE runs, built only from the records in results/glue/*.json.

    python Mistral-7B/make_table.py                    # print Table 2 and the LR sweeps
    python Mistral-7B/make_table.py --readme Mistral-7B/README.md   # also rewrite the README's generated block

`make_table(results_dir)` is Table 2 (optimizers x tasks + average; main_figures imports it):
each cell is the task's dev metric x 100 (Matthews for CoLA, Pearson for STS-B, accuracy otherwise; MNLI
matched), mean ± std over seeds at the optimizer's tuned (lr, reg): the setting run with the most seeds, ties
(e.g. one seed per LR) broken by the best score.
`make_sweep_table(results_dir)` is dev metric per optimizer and learning rate, with the median step time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from glue_metrics import GLUE_TASKS, primary_metric  # noqa: E402

from core import REPO_ROOT, load_records  # noqa: E402

EXPERIMENT = "glue"
OPTIMIZERS = ("sgd", "scaled_gd", "adamw", "scaled_adamw", "peft_riemannian", "loraplus", "lora_rite")
BEGIN, END = "<!-- make_table.py: begin -->", "<!-- make_table.py: end -->"


def _order(row: str) -> tuple:
    name = row.split()[0]
    return (OPTIMIZERS.index(name) if name in OPTIMIZERS else len(OPTIMIZERS), row)


def score(record) -> float | None:
    """The record's Table-2 metric x 100 (None when it was not measured or is not finite)."""
    value = record.final_metrics.get(primary_metric(record.tags["task"]))
    return None if value is None or value != value else 100.0 * value


def _runs(results_dir, preset=None, split_reg=False):
    """{preset: {(row, task): {lr: [records]}}}; row is the optimizer, or with split_reg "optimizer reg=R"
    for optimizers run with several reg values."""
    records = [r for r in load_records(results_dir, EXPERIMENT) if preset is None or r.tags.get("preset") == preset]
    regs = defaultdict(set)
    for r in records:
        regs[r.optimizer].add(r.hparams.get("reg"))
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        row = f"{r.optimizer} reg={r.hparams['reg']:g}" if split_reg and len(regs[r.optimizer]) > 1 else r.optimizer
        key = r.hparams["lr"] if split_reg else (r.hparams["lr"], r.hparams.get("reg"))
        out[r.tags.get("preset", "?")][(row, r.tags["task"])][key].append(r)
    return out


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    text = f"{statistics.mean(values):.1f}"
    return text + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def _best(by_config: dict) -> tuple[tuple, list[float]]:
    """The tuned (lr, reg): the one run with the most seeds, ties broken by the best seed-mean; and its scores."""
    scored = {c: [s for s in map(score, rs) if s is not None] for c, rs in by_config.items()}
    config = max(scored, key=lambda c: (len(scored[c]), statistics.mean(scored[c]) if scored[c] else float("-inf")))
    return config, scored[config]


def make_table(results_dir: str | Path = REPO_ROOT / "results", preset: str | None = None) -> str:
    """Table 2: optimizers x tasks + average, one markdown table per preset (cell: score @ best lr)."""
    blocks = []
    for name, runs in sorted(_runs(results_dir, preset).items()):
        tasks = [t for t in GLUE_TASKS if any(task == t for _, task in runs)]
        lines = [f"**{name}** (dev metric x 100, mean ± std over seeds, @ tuned lr, reg)", "",
                 "| optimizer | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
        for optim in sorted({o for o, _ in runs}, key=_order):
            cells, means = [], []
            for task in tasks:
                if (optim, task) not in runs:
                    cells.append("–")
                    continue
                (lr, reg), scores = _best(runs[optim, task])
                cells.append(f"{_mean_std(scores)} @ {lr:g}" + ("" if reg is None else f", reg {reg:g}"))
                means.append(statistics.mean(scores) if scores else None)
            avg = f"{statistics.mean(means):.1f}" if len(means) == len(tasks) and None not in means else "–"
            lines.append(f"| {optim} | " + " | ".join(cells) + f" | {avg} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def make_sweep_table(results_dir: str | Path = REPO_ROOT / "results", preset: str = "minilm_sst2",
                     task: str = "sst2") -> str:
    """Dev metric x 100 per optimizer (rows) and learning rate (columns); mean ± std where several seeds ran;
    † marks a run stopped by a non-finite gradient; last column: median step time over the optimizer's runs."""
    runs = _runs(results_dir, preset, split_reg=True).get(preset, {})
    runs = {optim: by_lr for (optim, t), by_lr in runs.items() if t == task}
    lrs = sorted({lr for by_lr in runs.values() for lr in by_lr})
    lines = [f"**{preset}**, {task}: dev {primary_metric(task)} x 100 by learning rate", "",
             "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | step time (ms) |",
             "|---" * (len(lrs) + 2) + "|"]
    for optim in sorted(runs, key=_order):
        cells = []
        for lr in lrs:
            records = runs[optim].get(lr, [])
            scores = [s for s in map(score, records) if s is not None]
            diverged = any("diverged_at_step" in r.final_metrics for r in records)
            cells.append(_mean_std(scores) + (" †" if diverged else "") if records else "–")
        times = [r.step_time_s for rs in runs[optim].values() for r in rs if r.step_time_s]
        step_ms = f"{1000 * statistics.median(times):.0f}" if times else "–"
        lines.append(f"| {optim} | " + " | ".join(cells) + f" | {step_ms} |")
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, text: str) -> None:
    """Replace the block between the BEGIN / END markers of `readme` with `text`."""
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise ValueError(f"{readme} has no '{BEGIN}' ... '{END}' block to fill")
    head, rest = content.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="results folder")
    parser.add_argument("--readme", type=Path, help="also write the tables into this README's generated block")
    args = parser.parse_args(argv)
    text = "\n".join([make_table(args.results), make_sweep_table(args.results)])
    print(text)
    if args.readme:
        write_readme(args.readme, text)
    return text


if __name__ == "__main__":
    main()
