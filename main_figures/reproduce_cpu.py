"""The CPU reproduction in one command: the theory and width experiments, the small real runs, then every figure and table.

    python main_figures/reproduce_cpu.py                      # the default steps, in order (about 65 min)
    python main_figures/reproduce_cpu.py --all                # also the peers, loss curves, runtime, SGD sweep
    python main_figures/reproduce_cpu.py --only theory,figures
    python main_figures/reproduce_cpu.py --only long_e2e_lr_a,figures   # a long-run step (README: Long CPU runs)
    python main_figures/reproduce_cpu.py --dry-run            # print the commands only
    python main_figures/reproduce_cpu.py --list

Each step runs the experiment's own committed command (a script in its folder) as a subprocess from the repository
root, streaming its progress bars. A failing step stops the reproduction with its exit status and the command to
resume from it. The optional ``long_*`` steps (:mod:`main_figures.long_runs`) run their jobs as two processes
side by side and skip finished configurations, so re-running a stopped one continues it. Records go to
``results/`` (re-running a configuration replaces its record), figures and tables to ``main_figures/out/``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for main_figures.long_runs


@dataclass
class Step:
    name: str
    title: str
    commands: list[list[str]]  # run in order from the repository root
    needs: list[str]  # repository files the commands need (a clear error when one is missing)
    default: bool = True  # part of the plain `reproduce_cpu.py` run; the others run with --all or --only


def _bash(*scripts: str, extra: tuple[str, ...] = ()) -> tuple[list[list[str]], list[str]]:
    return [["bash", s, *extra] for s in scripts], list(scripts)


def default_steps(python: str = sys.executable) -> list[Step]:
    """The reproduction: theory, width, the small real runs of GPT-2/ (SmolLM2 on E2E) and Mistral-7B/ (MiniLM on SST-2)
    through their committed sweep scripts, then every figure and table. The default steps take about 65 minutes
    on a small CPU; the peers, the loss curves, the runtime case and the SGD sweep add about an hour more."""
    return [
        Step("theory", "theory experiment: GD vs scaled GD (and AdamW vs scaled AdamW) across condition numbers",
             [[python, "main_figures/theory.py"]], ["main_figures/theory.py"]),
        Step("width", "width experiment: best learning rate vs width n (Theorem 4.1) and vs the LoRA scaling",
             [[python, "main_figures/width.py"]], ["main_figures/width.py"]),
        Step("gpt2_table1", "SmolLM2-135M on E2E, Table 1: the four optimizers at their paper learning rates",
             *_bash("GPT-2/scripts/cpu_table1.sh")),
        Step("gpt2_lr", "SmolLM2-135M on E2E: LR sweep of AdamW vs scaled AdamW (1e-5 to 1e-2)",
             *_bash("GPT-2/scripts/cpu_lr_sweep.sh")),
        Step("glue", "MiniLM-L6 on SST-2: LR sweep of AdamW vs scaled AdamW (1e-5 to 1e-2), SGD and scaled GD tuned",
             [["bash", "Mistral-7B/scripts/sweep.sh", "minilm_lr", "optim=adamw,scaled_adamw"],
              ["bash", "Mistral-7B/scripts/minilm_sst2.sh", "sgd"],
              ["bash", "Mistral-7B/scripts/minilm_sst2.sh", "scaled_gd"]],
             ["Mistral-7B/scripts/sweep.sh", "Mistral-7B/scripts/minilm_sst2.sh"]),
        Step("figures", "every figure and table from results/ into main_figures/out/",
             [[python, "main_figures/make_figures.py"]], ["main_figures/make_figures.py"]),
        Step("gpt2_peers", "SmolLM2-135M on E2E: LR sweep of the peers (PEFT Riemannian, LoRA+, LoRA-RITE)",
             *_bash("GPT-2/scripts/cpu_peers.sh"), default=False),
        Step("gpt2_loss_curves", "SmolLM2-135M on E2E: SGD vs scaled GD training-loss curves",
             *_bash("GPT-2/scripts/cpu_loss_curves.sh"), default=False),
        Step("gpt2_runtime", "runtime per step at LoRA rank 4 and 256 (GPT-2 medium shape, random weights)",
             *_bash("GPT-2/scripts/runtime.sh"), default=False),
        Step("glue_peers", "MiniLM-L6 on SST-2: LR sweep of the peers",
             *_bash("Mistral-7B/scripts/sweep.sh", extra=("minilm_lr", "optim=peft_riemannian,loraplus,lora_rite")),
             default=False),
        Step("glue_sgd", "MiniLM-L6 on SST-2: LR sweep of SGD vs scaled GD",
             *_bash("Mistral-7B/scripts/sweep.sh", extra=("minilm_lr_sgd",)), default=False),
        Step("glue_lora_scale", "MiniLM-L6 on SST-2: best lr of AdamW and scaled AdamW vs LoRA rank, alpha, rsLoRA",
             [["bash", "Mistral-7B/scripts/sweep.sh", "minilm_lora_scale"],
              ["bash", "Mistral-7B/scripts/sweep.sh", "minilm_lora_scale_rslora"]],
             ["Mistral-7B/scripts/sweep.sh"], default=False),
        *long_steps(python),
    ]  # fmt: skip


def long_steps(python: str = sys.executable) -> list[Step]:
    """The optional long-run steps of :data:`main_figures.long_runs.LONG_STEPS`, each one driver command."""
    from main_figures.long_runs import LONG_STEPS

    return [Step(step.name, step.title, [[python, "main_figures/long_runs.py", step.name]],
                 ["main_figures/long_runs.py", step.script], default=False) for step in LONG_STEPS]


class StepFailed(RuntimeError):
    """A step's command exited with a non-zero status (or could not start)."""

    def __init__(self, step: Step, command: list[str], status: int | str, elapsed: float):
        self.step, self.command, self.status = step, command, status
        super().__init__(
            f"step '{step.name}' failed ({status}) after {elapsed:.0f} s while running: {shlex.join(command)}"
        )


def select_steps(steps: list[Step], only: str | None, run_all: bool = False) -> list[Step]:
    """The steps named in the comma-separated ``only`` (else the default steps, or all with ``run_all``), in the
    reproduction's order; figures always come last."""
    if not only:
        chosen = [s for s in steps if run_all or s.default]
    else:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        names = [s.name for s in steps]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown} in --only; the steps are {names}")
        chosen = [s for s in steps if s.name in wanted]
    return [s for s in chosen if s.name != "figures"] + [s for s in chosen if s.name == "figures"]


def _fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def run_steps(steps: list[Step], *, dry_run: bool = False, root: Path = ROOT, out=print) -> list[tuple[str, float]]:
    """Run the steps in order and return (name, seconds) of each; raise :class:`StepFailed` at the first failure."""
    done = []
    start_all = time.perf_counter()
    for i, step in enumerate(steps, 1):
        out(f"\n[{i}/{len(steps)}] {step.name}: {step.title}")
        missing = [f for f in step.needs if not (root / f).is_file()]
        for command in step.commands:
            out(f"  $ {shlex.join(['python' if c == sys.executable else c for c in command])}")
        if dry_run:
            if missing:
                out(f"  (missing: {', '.join(missing)})")
            continue
        start = time.perf_counter()
        if missing:
            raise StepFailed(step, step.commands[0], f"missing {', '.join(missing)}", 0.0)
        for command in step.commands:
            try:
                status = subprocess.run(command, cwd=root).returncode
            except OSError as err:
                raise StepFailed(step, command, f"cannot start: {err}", time.perf_counter() - start) from err
            if status != 0:
                raise StepFailed(step, command, f"exit status {status}", time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        done.append((step.name, elapsed))
        out(f"[{i}/{len(steps)}] {step.name} done in {_fmt_time(elapsed)} "
            f"(total {_fmt_time(time.perf_counter() - start_all)})")  # fmt: skip
    return done


def main(argv: list[str] | None = None, steps: list[Step] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated steps to run, e.g. theory,figures")
    parser.add_argument("--all", action="store_true", help="run every step, the optional ones too")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    args = parser.parse_args(argv)
    steps = default_steps() if steps is None else steps
    if args.list:
        for s in steps:
            print(f"{s.name:17s} {'' if s.default else '(optional) '}{s.title}")
        return 0
    try:
        selected = select_steps(steps, args.only, args.all)
    except ValueError as err:
        parser.error(str(err))
    try:
        done = run_steps(selected, dry_run=args.dry_run)
    except StepFailed as err:
        names = [s.name for s in selected]
        rest = ",".join(names[names.index(err.step.name) :])
        print(f"\nerror: {err}\nfix it, then resume with: python main_figures/reproduce_cpu.py --only {rest}",
              file=sys.stderr)  # fmt: skip
        return 1
    if not args.dry_run:
        total = sum(t for _, t in done)
        print(f"\nreproduction finished in {_fmt_time(total)}: " + ", ".join(f"{n} {_fmt_time(t)}" for n, t in done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
