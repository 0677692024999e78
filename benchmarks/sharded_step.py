"""Median optimizer-step time under FSDP2 (fully_shard) against the same step unsharded in one process.

    torchrun --nproc_per_node 2 benchmarks/sharded_step.py [--rounds 8] [--steps 4] [--cases ...] [--out FILE]
    torchrun --nproc_per_node N benchmarks/sharded_step.py --device cuda [--out FILE]      # NCCL, one GPU a rank

The LoRA shapes are benchmarks/optimizer_step.py's cases (its ``LoraFactors`` model, every factor row-sharded by
``fully_shard``; the same gradients, sharded). Candidates, interleaved in rounds of ``--steps`` consecutive steps:
  sharded_adamw, sharded_scaled_adamw   core's "adamw" / "scaled_adamw" on the FSDP2 shards, every rank stepping
  single_adamw, single_scaled_adamw     the same optimizers on the unsharded factors, in rank 0 alone (the other
                                        ranks wait at a barrier)
A sharded step's time is the slowest rank's. Reported: the median [IQR] of the 2nd and later steps of the rounds
and the ratios sharded / single and scaled_adamw / adamw. Run without torchrun it is one process, a world of one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import build_optimizer  # noqa: E402
from harness import hardware_info  # noqa: E402
from optimizer_step import CASES, LoraFactors, checked_rounds_steps_cases  # noqa: E402

CANDIDATES = ("sharded_adamw", "sharded_scaled_adamw", "single_adamw", "single_scaled_adamw")
HPARAMS = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _optimizer(candidate: str, model) -> torch.optim.Optimizer:
    if candidate.endswith("scaled_adamw"):
        return build_optimizer(model, "scaled_adamw", reg=1e-6, **HPARAMS)
    return build_optimizer(model, "adamw", **HPARAMS)


def bench_case(case: str, rounds: int, steps: int, device: str) -> dict[str, list[float]]:
    """{candidate: seconds of each timed step} (on rank 0; the sharded ones the slowest rank's)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    shapes, layers, r = CASES[case]
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    models, opts = {}, {}
    for candidate in CANDIDATES:
        torch.manual_seed(0)  # the same factors and gradients for every candidate
        model = LoraFactors(shapes, layers, r, device, torch.float32)
        if candidate.startswith("sharded"):
            grads = [p.grad for p in model.parameters()]
            fully_shard(model)
            for p, g in zip(model.parameters(), grads):
                p.grad = distribute_tensor(g, p.device_mesh, [Shard(0)])
        elif rank != 0:
            continue
        models[candidate], opts[candidate] = model, _optimizer(candidate, model)
    times: dict[str, list[float]] = defaultdict(list)
    for round_ in range(1 + rounds):
        shift = round_ % len(CANDIDATES)
        for candidate in CANDIDATES[shift:] + CANDIDATES[:shift]:
            for step in range(steps):
                dist.barrier()
                seconds = torch.zeros((), dtype=torch.float64, device=device)
                if candidate in opts:  # the single-process candidates step in rank 0 only
                    sync()
                    start = time.perf_counter()
                    opts[candidate].step()
                    sync()
                    seconds += time.perf_counter() - start
                dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
                if round_ > 0 and step > 0:
                    times[candidate].append(float(seconds))
    return times


def table(case_times: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = [
        "| case | " + " | ".join(CANDIDATES) + " | sharded / single (scaled_adamw) | sharded scaled_adamw / adamw |",
        "|---|" + "---|" * (len(CANDIDATES) + 2),
    ]
    for case, times in case_times.items():
        med = {c: statistics.median(t) for c, t in times.items()}
        cells = []
        for c in CANDIDATES:
            q = statistics.quantiles(times[c], n=4) if len(times[c]) > 1 else [times[c][0]] * 3
            cells.append(f"{med[c] * 1e3:.2f} ms [{q[0] * 1e3:.2f}-{q[2] * 1e3:.2f}]")
        ratio = med["sharded_scaled_adamw"] / med["single_scaled_adamw"]
        overhead = med["sharded_scaled_adamw"] / med["sharded_adamw"]
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {ratio:.2f}x | {overhead:.2f}x |")
    return lines


def _init(device: str) -> str:
    """Join (or, without torchrun, make a world of one) the process group; the device this rank uses."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        store = dist.FileStore(str(Path(tempfile.mkdtemp(prefix="sharded_step_")) / "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def main(argv=None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (each candidate runs --steps per round)")
    parser.add_argument("--steps", type=int, default=4, help="consecutive steps per candidate and round (>= 2)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (CPU)")
    parser.add_argument("--out", type=Path, help="also write the table to this file (rank 0)")
    args = parser.parse_args(argv)
    cases = checked_rounds_steps_cases(parser, args)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    torch.set_num_threads(args.threads)
    device = _init(args.device)
    try:
        results = {case: bench_case(case, args.rounds, args.steps, device) for case in cases}
        world, rank = dist.get_world_size(), dist.get_rank()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    hw = hardware_info()
    launcher = f"torchrun --nproc_per_node {world} " if "WORLD_SIZE" in os.environ else "python "
    lines = [
        f"# optimizer step under FSDP2, {world} process(es) ({args.device}; {hw['gpu'] or hw['cpu']}, "
        f"{args.threads} thread(s) each, torch {hw['torch']}) against one unsharded process; median [IQR] of the 2nd "
        f"and later steps of {args.rounds} rounds of {args.steps} steps per candidate",
        f"# command: {launcher}benchmarks/sharded_step.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
        *table(results),
    ]
    if args.device == "cpu":
        lines += ["", "# on GPUs: torchrun --nproc_per_node N benchmarks/sharded_step.py --device cuda"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
