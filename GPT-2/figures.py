"""Tables and figures of the GPT-2 / E2E experiment, from the records under ``results/`` (nothing hard-coded).

* :func:`table1` -- paper Table 1: the four optimizers at their paper learning rate x the five E2E metrics;
* :func:`lr_sweep_table` -- one metric over the learning-rate sweeps (optimizer x lr);
* :func:`loss_curves` -- SGD vs scaled GD training loss per step at lr 1e-2, 1e-3, 1e-4;
* :func:`runtime_figure` -- wall-clock per step of the four optimizers at r = 4 and r = 256.

``main_figures/`` imports these; ``python GPT-2/figures.py [--readme GPT-2/README.md]`` prints the tables (and
writes them into the README's results section) and writes the figures.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

from harness import ALL_OPTIMIZERS, OPTIMIZER_NAMES, REPO_ROOT, load_records  # noqa: E402

from main_figures.metrics import GRID_NOTE, format_width, lr_points, lr_robustness, outcome_label  # noqa: E402
from main_figures.metrics import robustness_verdict, run_outcome, tolerance_for  # noqa: E402

HERE = Path(__file__).resolve().parent

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
LABELS = {"sgd": "SGD", "scaled_gd": "scaled GD", "adamw": "AdamW", "scaled_adamw": "scaled AdamW",
          "peft_riemannian": "PEFT Riemannian", "loraplus": "LoRA+", "lora_rite": "LoRA-RITE"}
LOSS_CURVE_LRS = (1e-2, 1e-3, 1e-4)


def paper_lr(optimizer: str) -> float:
    """The optimizer's paper learning rate, read from ``conf/optim/<optimizer>.yaml``."""
    return float(OmegaConf.load(HERE / "conf" / "optim" / f"{optimizer}.yaml").lr)


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6)


def _latest(records):
    return max(records, key=lambda r: r.created)


def _save(fig, out_png: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _records(results_dir: str | Path, experiment: str = "gpt2_e2e") -> list:
    """The experiment's records; a file that is not a run record is skipped with a warning naming it."""
    return load_records(results_dir, experiment, on_invalid="warn")


def _left_out_note(records) -> list[str]:
    """A line naming the runs that are still running or were interrupted (left out of every value)."""
    left = [r for r in records if run_outcome(r) in ("running", "interrupted")]
    if not left:
        return []
    runs = ", ".join(f"{LABELS.get(r.optimizer, r.optimizer)} lr {r.hparams['lr']:g} ({run_outcome(r)})" for r in left)
    return [f"Left out (still running or interrupted): {runs}.\n"]


def table1(results_dir: str | Path, preset: str | None = None, sweep: str = "table1") -> str:
    """Markdown Table 1 (one per preset found, or only ``preset``): each of the four optimizers at its paper lr.

    Uses the records tagged ``sweep=<sweep>`` (records without a sweep tag count as ``table1``); per optimizer
    and preset the newest one at the paper lr. The best value of each metric is in bold. Raises
    ``FileNotFoundError`` when no such record exists.
    """
    records = [r for r in _records(results_dir)
               if r.optimizer in OPTIMIZER_NAMES and ("BLEU" in r.final_metrics or run_outcome(r) != "done")
               and _same(r.hparams["lr"], paper_lr(r.optimizer)) and r.tags.get("sweep", "table1") == sweep
               and (preset is None or r.tags.get("preset") == preset)]
    if not records:
        raise FileNotFoundError(f"no gpt2_e2e records (sweep={sweep}) at the paper learning rates in {results_dir}"
                                + (f" for preset {preset!r}" if preset else ""))
    by_preset = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_preset[r.tags.get("preset", "?")][r.optimizer].append(r)
    out = []
    for name in sorted(by_preset):
        # per optimizer the newest run that is over (done, diverged or failed); running / interrupted ones are noted
        over = {opt: [r for r in rs if run_outcome(r) in ("done", "diverged", "failed")]
                for opt, rs in by_preset[name].items()}
        chosen = {opt: _latest(rs) for opt, rs in over.items() if rs}
        done = [r for r in chosen.values() if run_outcome(r) == "done"]
        best = {m: max((r.final_metrics[m] for r in done), default=None) for m in METRICS}
        first = (done or list(chosen.values()) or [None])[0]
        if first is None:
            out += [f"**{name}**: every run at the paper learning rates is still running or was interrupted\n"]
            out += _left_out_note([r for rs in by_preset[name].values() for r in rs])
            continue
        out.append(f"**{name}**: {first.final_metrics.get('test_mrs', '?')} test MRs, "
                   f"{first.final_metrics.get('steps', '?')} training steps, seed {first.seed}\n")
        out.append("| optimizer | lr | " + " | ".join(m.replace("_", "-") for m in METRICS) + " |")
        out.append("|---|---|" + "---|" * len(METRICS))
        for opt in OPTIMIZER_NAMES:
            if opt not in chosen:
                continue
            r = chosen[opt]
            if run_outcome(r) != "done":  # diverged / failed: never a value, whatever was scored after stopping
                cells = [outcome_label(r)] * len(METRICS)
            else:
                cells = [f"**{_fmt(r.final_metrics[m])}**" if _same(r.final_metrics[m], best[m])
                         else _fmt(r.final_metrics[m]) for m in METRICS]
            out.append(f"| {LABELS[opt]} | {r.hparams['lr']:g} | " + " | ".join(cells) + " |")
        out.append("")
        out += _left_out_note([r for rs in by_preset[name].values() for r in rs if r not in chosen.values()])
    return "\n".join(out)


def metric_of(record, metric: str):
    """A final metric of ``record``, or ``train_loss_tail``: the mean training loss of its last 5 steps."""
    if metric == "train_loss_tail":
        losses = [s["loss"] for s in record.steps if s.get("loss") is not None][-5:]
        return sum(losses) / len(losses) if losses else None
    return record.final_metrics.get(metric)


def lr_sweep_table(results_dir: str | Path, metric: str = "BLEU", preset: str = "smollm2_cpu",
                   sweep: str = "lr") -> str:
    """Markdown table of ``metric`` (see :func:`metric_of`, e.g. BLEU or valid_loss_best) per optimizer x lr.

    Uses the records tagged ``sweep=<sweep>`` of ``preset``; a diverged run shows ``diverged@<step>``, a failed,
    running or interrupted one its status (none of them is a value). For a metric with a tolerance
    (``main_figures.metrics.TOLERANCES``: BLEU) each optimizer's best and the width in decades of its learning-rate
    interval within the tolerance follow, with the "most robust" verdict under the table.
    """
    records = [r for r in _records(results_dir)
               if r.tags.get("sweep") == sweep and r.tags.get("preset") == preset]
    if not records:
        raise FileNotFoundError(f"no gpt2_e2e records with tags sweep={sweep}, preset={preset!r} in {results_dir}")
    lrs = sorted({float(r.hparams["lr"]) for r in records})
    cell = {(r.optimizer, float(r.hparams["lr"])): r for r in records}
    opts = [o for o in ALL_OPTIMIZERS if any(k[0] == o for k in cell)]
    tol = tolerance_for("gpt2_e2e", metric)
    rob = None
    if tol is not None:  # BLEU: each optimizer's best and its learning-rate interval within the tolerance
        points = {o: lr_points([r for r in records if r.optimizer == o], metric) for o in opts}
        rob = lr_robustness(points, "gpt2_e2e", metric, higher=True)
    extra = ["best", f"width (decades) within {tol.text}"] if rob else []
    lines = [f"| optimizer \\ lr ({metric}) | " + " | ".join([f"{lr:g}" for lr in lrs] + extra) + " |",
             "|---|" + "---|" * (len(lrs) + len(extra))]
    for opt in opts:
        row = []
        for lr in lrs:
            r = cell.get((opt, lr))
            if r is None:
                row.append("")
            elif run_outcome(r) != "done":
                row.append(outcome_label(r))
            else:
                row.append(_fmt(metric_of(r, metric)))
        if rob:
            best = rob.row(opt)
            row += [_fmt(best.best) if math.isfinite(best.best) else "-", format_width(best)]
        lines.append(f"| {LABELS[opt]} | " + " | ".join(row) + " |")
    if rob:
        lines += ["", f"Robustness: {GRID_NOTE}; tolerance {tol.text}.", ""]
        lines += robustness_verdict(rob, lambda o: LABELS.get(o, o))
    left = _left_out_note(records)
    return "\n".join(lines) + "\n" + ("\n" + "".join(left) if left else "")


def loss_curves(results_dir: str | Path, out_png: str | Path, preset: str | None = None) -> Path:
    """Training loss vs step, SGD vs scaled GD, one panel per lr in 1e-2, 1e-3, 1e-4 (``sweep=loss_curves``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in _records(results_dir)
               if r.optimizer in ("sgd", "scaled_gd") and r.tags.get("sweep") == "loss_curves"
               and (preset is None or r.tags.get("preset") == preset)]
    if not records:
        raise FileNotFoundError(f"no gpt2_e2e records tagged sweep=loss_curves in {results_dir}")
    fig, axes = plt.subplots(1, len(LOSS_CURVE_LRS), figsize=(4 * len(LOSS_CURVE_LRS), 3.2), sharey=True)
    for ax, lr in zip(axes, LOSS_CURVE_LRS):
        for opt, style in (("sgd", "--"), ("scaled_gd", "-")):
            runs = [r for r in records if r.optimizer == opt and _same(r.hparams["lr"], lr)]
            if runs:
                r = max(runs, key=lambda x: x.created)
                steps = [s for s in r.steps if s.get("loss") is not None]
                ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], style, label=LABELS[opt])
        ax.set_title(f"lr = {lr:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    axes[0].legend()
    presets = sorted({r.tags.get("preset", "?") for r in records})
    fig.suptitle(f"E2E, SGD vs scaled GD ({', '.join(presets)})")
    return _save(fig, out_png)


def runtime_table(results_dir: str | Path) -> str:
    """Markdown: median seconds per training step (and per optimizer step) for each device, optimizer and rank."""
    records = [r for r in _records(results_dir, "gpt2_runtime") if r.step_time_s is not None]
    if not records:
        raise FileNotFoundError(f"no gpt2_runtime records in {results_dir}")
    lines = ["| device | batch x seq | optimizer | r | s / step | s / optimizer step | trainable |",
             "|---|---|---|---|---|---|---|"]
    order = {o: i for i, o in enumerate(ALL_OPTIMIZERS)}
    for r in sorted(records, key=lambda x: (x.tags.get("device", "?"), int(x.tags["r"]), order[x.optimizer])):
        t = r.tags
        lines.append(f"| {t.get('device', '?')} | {t.get('batch')} x {t.get('seq')} | {LABELS[r.optimizer]} | {t['r']} "
                     f"| {r.step_time_s:.3f} | {r.final_metrics['opt_time_s']:.4f} | "
                     f"{r.final_metrics['trainable_params']:,} |")
    return "\n".join(lines) + "\n"


def runtime_figure(results_dir: str | Path, out_png: str | Path) -> Path:
    """Median wall-clock per training step (bars) of each optimizer at each LoRA rank; one panel per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in _records(results_dir, "gpt2_runtime") if r.step_time_s is not None]
    if not records:
        raise FileNotFoundError(f"no gpt2_runtime records in {results_dir}")
    devices = sorted({r.tags.get("device", "?") for r in records})
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 3.5), squeeze=False)
    for ax, device in zip(axes[0], devices):
        recs = [r for r in records if r.tags.get("device", "?") == device]
        ranks = sorted({int(r.tags["r"]) for r in recs})
        opts = [o for o in ALL_OPTIMIZERS if any(r.optimizer == o for r in recs)]
        width = 0.8 / len(ranks)
        for j, rank in enumerate(ranks):
            times = []
            for opt in opts:
                runs = [r for r in recs if r.optimizer == opt and int(r.tags["r"]) == rank]
                times.append(max(runs, key=lambda x: x.created).step_time_s if runs else 0.0)
            xs = [i + (j - (len(ranks) - 1) / 2) * width for i in range(len(opts))]
            bars = ax.bar(xs, times, width, label=f"r = {rank}")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        shape = recs[0].tags
        ax.set_xticks(range(len(opts)), [LABELS[o] for o in opts])
        ax.set_ylabel("seconds per step")
        ax.set_title(f"GPT-2 medium shape, {device}, batch {shape.get('batch')} x seq {shape.get('seq')}")
        ax.legend()
    return _save(fig, out_png)


def results_markdown(results_dir: str | Path) -> str:
    """The results section of GPT-2/README.md: Table 1 and the LR sweep tables, from the records."""
    parts = ["### Table 1 (the four optimizers at their paper learning rate)\n", table1(results_dir)]
    try:
        parts += ["### Table 1 with a 10-step warm-up (`sweep=warmup10`)\n", table1(results_dir, sweep="warmup10")]
    except FileNotFoundError:
        pass
    sections = [("lr", "BLEU", "test BLEU"), ("lr", "valid_loss_best", "best validation loss"),
                ("loss_curves", "train_loss_tail", "training loss, mean of the last 5 steps (loss-curve runs)"),
                ("loss_curves", "valid_loss_best", "best validation loss (loss-curve runs)")]
    for sweep, metric, title in sections:
        try:
            table = lr_sweep_table(results_dir, metric, sweep=sweep)
        except FileNotFoundError:
            continue
        parts += [f"### Learning-rate sweep: {title}\n", table]
    try:
        parts += ["### Runtime (GPT-2 medium shape, random weights; `runtime.py`)\n", runtime_table(results_dir)]
    except FileNotFoundError:
        pass
    return "\n".join(parts)


def update_readme(readme: str | Path, results_dir: str | Path) -> None:
    """Replace the text between the README's ``<!-- results:start -->`` and ``<!-- results:end -->`` markers."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{results_markdown(results_dir)}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the GPT-2/E2E tables and write its figures.")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "main_figures" / "out")
    parser.add_argument("--readme", type=Path, default=None, help="also rewrite this README's results section")
    args = parser.parse_args(argv)
    print(results_markdown(args.results))
    if args.readme:
        update_readme(args.readme, args.results)
        print("updated", args.readme)
    for name, fn in (("gpt2_loss_curves.png", loss_curves), ("gpt2_runtime.png", runtime_figure)):
        try:
            print("wrote", fn(args.results, args.out / name))
        except FileNotFoundError as err:
            print(f"(skipped {name}: {err})")


if __name__ == "__main__":
    main()
