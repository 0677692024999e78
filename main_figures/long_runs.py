"""The long CPU runs (README "Long CPU runs"): each step runs its jobs as two single-thread processes side by side.

    python main_figures/long_runs.py --list                  # the steps, their jobs and sweeps
    python main_figures/long_runs.py long_e2e_lr             # one step (re-run the same command to continue it)
    python main_figures/long_runs.py long_e2e_lr --dry-run   # its two job lists

A step is a list of jobs taken from versioned Hydra sweeps (``<experiment>/conf/sweep/<sweep>.yaml``, the same files
``python <experiment>/train.py -m sweep=<sweep>`` runs), optionally narrowed to some of a sweep's values (a step never
runs a configuration its sweep does not define). The job list is split in two halves (every other job, so both
halves get every learning rate) that run concurrently, each one job after the other, as
``python <experiment>/train.py sweep=<sweep> <key>=<value>... skip_finished=true resume=auto threads=1``: a
configuration whose record is finished is skipped, a run that was killed continues from its latest checkpoint (or
starts afresh without one). So a step that was stopped is continued by re-running its command. Progress streams as
the jobs print it, each line of the driver prefixed by its half; a failing job stops its half, the other half runs
to its end, and the step exits non-zero naming the failed jobs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"gpt2_e2e": "GPT-2", "glue": "Mistral-7B"}  # record folder -> experiment folder
RESUMABLE = ("skip_finished=true", "resume=auto", "threads=1")  # what every job of a step adds


@dataclass(frozen=True)
class Part:
    """The jobs of one sweep file, ``narrow`` replacing some of its swept values by a subset of them."""

    sweep: str
    narrow: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LongStep:
    name: str
    title: str
    experiment: str  # a key of EXPERIMENTS
    parts: tuple[Part, ...]

    @property
    def script(self) -> str:
        return f"{EXPERIMENTS[self.experiment]}/train.py"

    def jobs(self, root: Path = ROOT) -> list[list[str]]:
        """The step's jobs, each the Hydra overrides of one run, in the order of its parts."""
        return [job for part in self.parts for job in sweep_jobs(root / EXPERIMENTS[self.experiment], part)]


def _values(value) -> list[str]:
    if isinstance(value, str):
        if any(fn in value for fn in ("range(", "choice(", "interval(", "glob(")):
            raise ValueError(f"sweep value {value!r}: the long-run driver expands comma-separated lists only")
        return [v.strip() for v in value.split(",")]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value).lower() if isinstance(value, bool) else str(value)]


def sweep_params(experiment_dir: Path, sweep: str) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` of ``<experiment_dir>/conf/sweep/<sweep>.yaml``: key -> its values, in file order."""
    path = experiment_dir / "conf" / "sweep" / f"{sweep}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no sweep '{sweep}' in {path.parent} (the sweeps there: {known})")
    params = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("hydra") or {}).get("sweeper", {})
    params = (params or {}).get("params")
    if not params:
        raise ValueError(f"{path} has no hydra.sweeper.params: not a sweep")
    return {str(key): _values(value) for key, value in params.items()}


def sweep_jobs(experiment_dir: Path, part: Part) -> list[list[str]]:
    """The runs of a sweep (Hydra's basic sweeper: the product of the swept values, the first key outermost), each
    ``["sweep=<name>", "<key>=<value>", ...]``; ``part.narrow`` keeps only some values of a key (a ValueError when a
    key is not swept or a value is not among the sweep's)."""
    params = sweep_params(experiment_dir, part.sweep)
    for key, wanted in part.narrow.items():
        if key not in params:
            raise ValueError(f"sweep '{part.sweep}' does not sweep '{key}' (it sweeps {list(params)})")
        values = _values(wanted)
        unknown = [v for v in values if v not in params[key]]
        if unknown:
            raise ValueError(f"sweep '{part.sweep}': {key}={unknown} is not among its values {params[key]}")
        params[key] = values
    return [[f"sweep={part.sweep}", *(f"{k}={v}" for k, v in zip(params, combo))]
            for combo in itertools.product(*params.values())]


def halves(jobs: list) -> tuple[list, list]:
    """Every other job: the two job lists a step runs side by side."""
    return jobs[0::2], jobs[1::2]


def _grid(optimizers: str, lrs: str, seed: int) -> dict[str, str]:
    """A sweep narrowed to these optimizers, rates and seed; the jobs run in this order (the likely best first)."""
    return {"optim": optimizers, "optim.lr": lrs, "seed": str(seed)}


def _variants(seed: int) -> tuple[Part, ...]:
    """LoRA+ and scaled AdamW (update) over the E2E grid at one seed, the rates near their likely best first (LoRA+
    below AdamW's best rate, the update variant above it) and the two optimizers alternating between the halves."""
    return (Part("long_lr", {"optim": "loraplus", "optim.lr": "3e-4,1e-4,1e-3", "seed": str(seed)}),
            Part("long_lr_update", {"optim.lr": "3e-3,1e-3,1e-2", "seed": str(seed)}),
            Part("long_lr", {"optim": "loraplus", "optim.lr": "3e-5,3e-3,1e-5,1e-2", "seed": str(seed)}),
            Part("long_lr_update", {"optim.lr": "3e-4,1e-4,3e-5,1e-5", "seed": str(seed)}),
            Part("long_lr_update", {"optim.lr": "3e-6,1e-6", "seed": str(seed)}))


# Sized by the measured cost of one run (README "Long CPU runs"): at most an hour each.
LONG_STEPS: tuple[LongStep, ...] = (
    LongStep("long_e2e_lr_a", "SmolLM2 on E2E, 100 steps: AdamW vs scaled AdamW (gradient) at lr 1e-3, 1e-2, 1e-4, "
             "seed 110", "gpt2_e2e", (Part("long_lr", _grid("adamw,scaled_adamw", "1e-3,1e-2,1e-4", 110)),)),
    LongStep("long_e2e_lr_b", "SmolLM2 on E2E, 100 steps: AdamW vs scaled AdamW (gradient) at lr 1e-5, 3e-4, 3e-3, "
             "seed 110", "gpt2_e2e", (Part("long_lr", _grid("adamw,scaled_adamw", "1e-5,3e-4,3e-3", 110)),)),
    LongStep("long_e2e_lr_c", "SmolLM2 on E2E, 100 steps: AdamW vs scaled AdamW (gradient) at lr 3e-5, seed 110",
             "gpt2_e2e", (Part("long_lr", _grid("adamw,scaled_adamw", "3e-5", 110)),)),
    LongStep("long_sst2_lr_a", "MiniLM on SST-2, 1000 steps: AdamW vs scaled AdamW (gradient) at lr 1e-5, 1e-4, "
             "1e-3, 1e-2, seed 42", "glue",
             (Part("minilm_long_lr", _grid("adamw,scaled_adamw", "1e-5,1e-4,1e-3,1e-2", 42)),)),
    LongStep("long_sst2_lr_b", "MiniLM on SST-2, 1000 steps: AdamW vs scaled AdamW (gradient) at lr 3e-5, 3e-4, "
             "3e-3, seed 42", "glue", (Part("minilm_long_lr", _grid("adamw,scaled_adamw", "3e-5,3e-4,3e-3", 42)),)),
    LongStep("long_sst2_update", "MiniLM on SST-2, 1000 steps: scaled AdamW (update) at lr 1e-5..3e-2, seed 42",
             "glue", (Part("minilm_long_lr_update", {"seed": "42"}),)),
    LongStep("long_sst2_seeds", "MiniLM on SST-2, 1000 steps: AdamW vs scaled AdamW (gradient) at lr 1e-3, 3e-3, "
             "seeds 43, 44", "glue",
             (Part("minilm_long_lr", {"optim": "adamw,scaled_adamw", "optim.lr": "1e-3,3e-3", "seed": "43,44"}),)),
    LongStep("long_sst2_curves", "MiniLM on SST-2, 1000 steps: SGD vs scaled GD at lr 0.3, 1, 3, seed 42", "glue",
             (Part("minilm_long_curves"),)),
    LongStep("long_sst2_loraplus", "MiniLM on SST-2, 1000 steps: LoRA+ at lr 1e-5..1e-2, seed 42", "glue",
             (Part("minilm_long_lr", {"optim": "loraplus", "seed": "42"}),)),
    LongStep("long_sst2_peers", "MiniLM on SST-2, 1000 steps: PEFT's Riemannian optimizer and LoRA-RITE at 3 rates "
             "around their best, seed 42", "glue",
             (Part("minilm_long_peft_riemannian"), Part("minilm_long_lora_rite"))),
    LongStep("long_e2e_curves", "SmolLM2 on E2E, 100 steps: SGD vs scaled GD at lr 1e-2, 3e-2, 1e-1, seed 110",
             "gpt2_e2e", (Part("long_curves"),)),
    LongStep("long_e2e_seeds", "SmolLM2 on E2E, 100 steps: seed 111 of AdamW at lr 3e-4, 1e-3 and scaled AdamW "
             "(gradient) at lr 1e-3, 1e-2, each optimizer's two best rates at seed 110", "gpt2_e2e",
             (Part("long_lr", {"optim": "adamw", "optim.lr": "3e-4,1e-3", "seed": "111"}),
              Part("long_lr", {"optim": "scaled_adamw", "optim.lr": "1e-3,1e-2", "seed": "111"}))),
    LongStep("long_e2e_table1", "SmolLM2 on E2E, 100 steps: Table 1, the paper's four optimizers at the paper's "
             "settings, seed 110", "gpt2_e2e", (Part("long_table1"),)),
    LongStep("long_sst2_longer", "MiniLM on SST-2, 3000 steps: AdamW and scaled AdamW (gradient) at lr 1e-3, 3e-3, "
             "seed 42", "glue",
             (Part("minilm_longer", {"optim": "adamw", "optim.lr": "1e-3"}),
              Part("minilm_longer", {"optim": "scaled_adamw", "optim.lr": "3e-3"}),
              Part("minilm_longer", {"optim": "adamw", "optim.lr": "3e-3"}),
              Part("minilm_longer", {"optim": "scaled_adamw", "optim.lr": "1e-3"}))),
    LongStep("long_e2e_seeds_b", "SmolLM2 on E2E, 100 steps: seed 111 of AdamW and scaled AdamW (gradient) at the "
             "other five rates of the grid", "gpt2_e2e",
             (Part("long_lr", {"optim": "adamw", "optim.lr": "3e-3,1e-4,1e-2,3e-5,1e-5", "seed": "111"}),
              Part("long_lr", {"optim": "scaled_adamw", "optim.lr": "3e-4,3e-3,1e-4,3e-5,1e-5", "seed": "111"}))),
    LongStep("long_e2e_variants", "SmolLM2 on E2E, 100 steps: LoRA+ at lr 1e-5..1e-2 and scaled AdamW (update) "
             "at lr 1e-6..1e-2, seed 110", "gpt2_e2e", _variants(110)),
    LongStep("long_e2e_peers", "SmolLM2 on E2E, 100 steps: PEFT's Riemannian optimizer and LoRA-RITE at 3 rates "
             "around their best smollm2_cpu rate, seed 110", "gpt2_e2e",
             (Part("long_peft_riemannian"), Part("long_lora_rite"))),
    LongStep("long_sst2_seeds_b", "MiniLM on SST-2, 1000 steps: seeds 43, 44 of AdamW and scaled AdamW (gradient) at "
             "lr 1e-5, 3e-5, 1e-4, 3e-4, 1e-2", "glue",
             tuple(Part("minilm_long_lr", {"optim": "adamw,scaled_adamw", "optim.lr": lr, "seed": "43,44"})
                   for lr in ("3e-4", "1e-2", "1e-4", "3e-5", "1e-5"))),  # one rate at a time, both optimizers
    LongStep("long_e2e_variants_seeds", "SmolLM2 on E2E, 100 steps: seed 111 of LoRA+ at lr 1e-5..1e-2 and scaled "
             "AdamW (update) at lr 1e-6..1e-2", "gpt2_e2e", _variants(111)),
    LongStep("long_sst2_loraplus_seeds", "MiniLM on SST-2, 1000 steps: seeds 43, 44 of LoRA+ at lr 1e-5..1e-2",
             "glue", (Part("minilm_long_lr", {"optim": "loraplus", "optim.lr": "3e-4,1e-4,1e-3,3e-5,3e-3,1e-5,1e-2",
                                              "seed": "43,44"}),)),
    LongStep("long_sst2_update_seeds", "MiniLM on SST-2, 1000 steps: seeds 43, 44 of scaled AdamW (update) at lr "
             "1e-5..3e-2", "glue",
             (Part("minilm_long_lr_update", {"optim.lr": "1e-2,3e-3,1e-3,3e-2,3e-4,1e-4,3e-5,1e-5",
                                             "seed": "43,44"}),)),
    LongStep("long_sst2_epochs", "MiniLM on SST-2, 3000 steps: three epochs of the 8,000 sentences, AdamW and scaled "
             "AdamW (gradient) at lr 1e-3, seed 42", "glue",
             (Part("minilm_three_epochs", {"optim.lr": "1e-3", "seed": "42"}),)),
    LongStep("long_sst2_epochs_seeds", "MiniLM on SST-2, 3000 steps as three epochs: AdamW and scaled AdamW "
             "(gradient) at lr 3e-3, seed 42, and at lr 1e-3, seeds 43, 44", "glue",
             (Part("minilm_three_epochs", {"optim.lr": "3e-3", "seed": "42"}),
              Part("minilm_three_epochs", {"optim.lr": "1e-3", "seed": "43,44"}))),
    LongStep("long_sst2_epochs_seeds_b", "MiniLM on SST-2, 3000 steps as three epochs: AdamW and scaled AdamW "
             "(gradient) at lr 3e-3, seeds 43, 44", "glue",
             (Part("minilm_three_epochs", {"optim.lr": "3e-3", "seed": "43,44"}),)),
    LongStep("long_sst2_epochs_update", "MiniLM on SST-2, 3000 steps as three epochs: scaled AdamW (update) at lr "
             "3e-3, 1e-2, seeds 42, 43, 44", "glue", (Part("minilm_three_epochs_update"),)),
    LongStep("long_sst2_epochs_loraplus", "MiniLM on SST-2, 3000 steps as three epochs: LoRA+ at lr 1e-4, 3e-4, "
             "seeds 42, 43, 44", "glue", (Part("minilm_three_epochs_loraplus"),)),
    LongStep("long_e2e_longer", "SmolLM2 on E2E, 300 steps: AdamW and scaled AdamW (gradient) at lr 1e-3, 3e-3, "
             "seed 110", "gpt2_e2e", (Part("long_longer", _grid("adamw,scaled_adamw", "3e-3,1e-3", 110)),)),
    LongStep("long_e2e_longer_seeds", "SmolLM2 on E2E, 300 steps: AdamW and scaled AdamW (gradient) at lr 1e-3, "
             "3e-3, seed 111", "gpt2_e2e", (Part("long_longer", _grid("adamw,scaled_adamw", "3e-3,1e-3", 111)),)),
)  # fmt: skip
# With these steps every run of the long sweeps has a step; together they take longer than 4 hours at the measured
# costs (README "Long CPU runs" says which ones ran). Each sweep also runs alone, e.g.
#   python GPT-2/train.py -m sweep=long_lora_rite skip_finished=true resume=auto


def step_named(name: str) -> LongStep:
    for step in LONG_STEPS:
        if step.name == name:
            return step
    raise ValueError(f"unknown long step {name!r}; the steps are {[s.name for s in LONG_STEPS]}")


def job_command(step: LongStep, job: list[str], python: str = sys.executable, extra: tuple[str, ...] = ()) -> list[str]:
    return [python, step.script, *job, *RESUMABLE, *extra]


class _Half(threading.Thread):
    def __init__(self, label: str, commands: list[list[str]], root: Path, env: dict, out, lock: threading.Lock):
        super().__init__(name=label, daemon=True)
        self.label, self.commands, self.root, self.env, self.out, self.lock = label, commands, root, env, out, lock
        self.failed: list[tuple[list[str], int | str]] = []
        self.ran = 0

    def say(self, text: str) -> None:
        with self.lock:
            self.out(f"[{self.label}] {text}")

    def run(self) -> None:
        for i, command in enumerate(self.commands, 1):
            start = time.perf_counter()
            self.say(f"job {i}/{len(self.commands)}: {shlex.join(command[1:])}")
            try:
                status = subprocess.run(command, cwd=self.root, env=self.env).returncode
            except OSError as err:
                status = f"cannot start: {err}"
            if status != 0:
                self.failed.append((command, status))
                self.say(f"FAILED (exit status {status}) after {time.perf_counter() - start:.0f} s: "
                         f"{shlex.join(command[1:])}; this half stops")
                return
            self.ran += 1
            self.say(f"job {i}/{len(self.commands)} done in {time.perf_counter() - start:.0f} s")


def run_step(step: LongStep, *, python: str = sys.executable, root: Path = ROOT, extra: tuple[str, ...] = (),
             dry_run: bool = False, out=functools.partial(print, flush=True)) -> float:
    """Run ``step``'s two halves concurrently (one thread each) and return the seconds it took; a RuntimeError
    naming every failed job when one failed (the other half still runs to its end)."""
    first, second = halves([job_command(step, job, python, extra) for job in step.jobs(root)])
    out(f"{step.name}: {step.title} -- {len(first) + len(second)} jobs as two halves of {len(first)} and "
        f"{len(second)}, side by side")
    if dry_run:
        for label, commands in (("A", first), ("B", second)):
            for command in commands:
                out(f"[{label}] $ {shlex.join(['python', *command[1:]])}")
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    lock = threading.Lock()
    workers = [_Half(label, commands, root, env, out, lock) for label, commands in (("A", first), ("B", second))]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    failed = [(w.label, c, s) for w in workers for c, s in w.failed]
    if failed:
        raise RuntimeError(f"step '{step.name}': {len(failed)} job(s) failed after {elapsed:.0f} s: " + "; ".join(
            f"[{label}] exit status {status}: {shlex.join(command[1:])}" for label, command, status in failed)
            + f". Fix it and re-run `python main_figures/long_runs.py {step.name}` (finished runs are skipped)")
    out(f"{step.name} done in {elapsed / 60:.1f} min")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="*", help="long steps to run in order (--list names them)")
    parser.add_argument("--list", action="store_true", help="list the steps and their jobs, and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the two job lists of each step")
    args, extra = parser.parse_known_args(argv)
    if args.list:
        for step in LONG_STEPS:
            parts = ", ".join(p.sweep + "".join(f" {k}={v}" for k, v in p.narrow.items()) for p in step.parts)
            print(f"{step.name:26s} {len(step.jobs()):3d} jobs  {step.title}  [sweeps: {parts}]")
        return 0
    if not args.steps:
        parser.error("name a step (--list shows them)")
    if any(not e.partition("=")[1] for e in extra):
        parser.error(f"unknown arguments {extra}: only Hydra overrides (key=value) are passed on to every job")
    try:
        steps = [step_named(name) for name in args.steps]
    except ValueError as err:
        parser.error(str(err))
    for step in steps:
        try:
            run_step(step, extra=tuple(extra), dry_run=args.dry_run)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
