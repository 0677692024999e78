"""Median optimizer-step time on LoRA-shaped parameters: torch AdamW, PEFT's Riemannian wrapper, ours.

    python benchmarks/optimizer_step.py [--rounds 8] [--steps 4] [--cases gpt2m_r4,gpt2m_r256,mistral_r16]
                                        [--threads N] [--out FILE]

Candidates (same parameters, same gradients), interleaved in rounds so that machine noise hits all alike: each
round runs every candidate (in a rotating order) for ``--steps`` consecutive steps. Two medians are reported:
  warm  the 2nd and later steps of a round: the optimizer's steady state, its data in the CPU caches
  cold  the first step of a round, just after the other candidates have evicted its data (a real training step
        sits between a forward and a backward pass, so it is nearer to this)
The candidates:
  torch_adamw_foreach  torch.optim.AdamW(foreach=True) over the LoRA factors
  torch_adamw_fused    torch.optim.AdamW(fused=True)
  peft_riemannian      peft.optimizers.create_riemannian_optimizer(model, torch.optim.AdamW)
  adamw                core's "adamw" (the identity preconditioner through the same code)
  scaled_adamw         core's "scaled_adamw"
Only ``optimizer.step()`` is timed; gradients are restored between steps (PEFT's wrapper overwrites them).
Prints, for warm and for cold steps, a table of medians with the interquartile range and the ratios the targets
are stated in:
scaled_adamw / torch_adamw_foreach (target <= 1.25 on CPU, <= 1.10 vs fused AdamW on a GPU) and
peft_riemannian / scaled_adamw (target >= 5 at GPT-2-medium r=4). A last table gives the compute floor: the time
the preconditioner's matrix products need (a lower bound on their operation count, at the device's best float32
matmul throughput), as a multiple of the baseline AdamW step: no implementation's scaled AdamW step can take less
than the floor plus an AdamW update.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
import sys
import time
from pathlib import Path

import torch
from peft.optimizers import create_riemannian_optimizer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

from core import build_optimizer  # noqa: E402
from harness import hardware_info  # noqa: E402

# name -> (list of (n_in, n_out) per adapted projection, layers, rank)
CASES = {
    "gpt2m_r4": ([(1024, 1024), (1024, 1024)], 24, 4),  # GPT-2 medium, q and v of 24 layers: 48 pairs
    "gpt2m_r256": ([(1024, 1024), (1024, 1024)], 24, 256),
    "mistral_r16": ([(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336)], 8, 16),  # q,k,v,o,gate
}


class LoraFactors(nn.Module):
    """Only the LoRA factors of a model, named as PEFT names them (``<layer>.<proj>.lora_A.default.weight``)."""

    def __init__(self, shapes, layers, r, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.ModuleDict()
            for j, (n_in, n_out) in enumerate(shapes):
                proj = nn.Module()
                proj.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, r, bias=False)})
                proj.lora_B = nn.ModuleDict({"default": nn.Linear(r, n_out, bias=False)})
                nn.init.normal_(proj.lora_B["default"].weight, std=0.02)
                layer[f"proj{j}"] = proj
            self.layers.append(layer)
        self.to(device=device, dtype=dtype)
        for p in self.parameters():
            p.grad = torch.randn_like(p) * 1e-3


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters()]
    hp = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if name == "torch_adamw_foreach":
        return torch.optim.AdamW(params, foreach=True, **hp)
    if name == "torch_adamw_fused":
        return torch.optim.AdamW(params, fused=True, **hp)
    if name == "peft_riemannian":
        return create_riemannian_optimizer(model, torch.optim.AdamW, reg=1e-6, **hp)
    if name == "adamw":
        return build_optimizer(model, "adamw", **hp)
    if name == "scaled_adamw":
        return build_optimizer(model, "scaled_adamw", reg=1e-6, **hp)
    raise ValueError(f"unknown candidate '{name}'")


def bench_case(
    case: str, candidates: list[str], rounds: int, steps: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """{"warm": {candidate: seconds per step}, "cold": {...}} from ``rounds`` rounds (after one untimed round)."""
    shapes, layers, r = CASES[case]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    models = {c: LoraFactors(shapes, layers, r, device, torch.float32) for c in candidates}
    grads = {c: [p.grad.clone() for p in m.parameters()] for c, m in models.items()}
    opts = {c: build(c, models[c]) for c in candidates}
    times: dict[str, dict[str, list[float]]] = {"warm": defaultdict(list), "cold": defaultdict(list)}
    for round_ in range(1 + rounds):
        shift = round_ % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:  # rotating order: no candidate always follows the same one
            for step in range(steps):
                for p, g in zip(models[c].parameters(), grads[c]):
                    p.grad.copy_(g)
                sync()
                start = time.perf_counter()
                opts[c].step()
                sync()
                if round_ > 0:
                    times["cold" if step == 0 else "warm"][c].append(time.perf_counter() - start)
    return times


def preconditioner_flops(case: str) -> float:
    """A lower bound on the floating-point operations of the preconditioner per step. Per pair (A: r x n, B: m x r)
    the products G_A = Gram⁻¹ ∇A and G_B = ∇B Gram⁻¹ take 2 r² n + 2 m r², and the Gram matrices BᵀB and AAᵀ at
    least m r² + n r² (their lower triangles only; this implementation computes both triangles): 3 r² (m + n)."""
    shapes, layers, r = CASES[case]
    return layers * sum(3.0 * r * r * (n_in + n_out) for n_in, n_out in shapes)


def matmul_flops_per_second(device: str, size: int = 2048, reps: int = 5) -> float:
    """The float32 matmul throughput this device reaches on a square product: the best case for the products above."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        sync()
        start = time.perf_counter()
        x @ x
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def table(case_times: dict[str, dict[str, list[float]]], candidates: list[str], baseline: str) -> list[str]:
    """Markdown rows: median [IQR] per candidate, then the two target ratios."""
    lines = [
        "| case | " + " | ".join(candidates) + f" | scaled_adamw / {baseline} | peft_riemannian / scaled_adamw |",
        "|---|" + "---|" * (len(candidates) + 2),
    ]
    for case, times in case_times.items():
        med = {c: statistics.median(t) for c, t in times.items()}
        cells = []
        for c in candidates:
            q = statistics.quantiles(times[c], n=4) if len(times[c]) > 1 else [times[c][0]] * 3
            cells.append(f"{med[c] * 1e3:.2f} ms [{q[0] * 1e3:.2f}-{q[2] * 1e3:.2f}]")
        lines.append(
            f"| {case} | " + " | ".join(cells)
            + f" | {med['scaled_adamw'] / med[baseline]:.2f}x | {med['peft_riemannian'] / med['scaled_adamw']:.2f}x |"
        )  # fmt: skip
    return lines


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (each candidate runs --steps per round)")
    parser.add_argument("--steps", type=int, default=4, help="consecutive steps per candidate and round (>= 2)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step of a round is the cold one), got {args.steps}")
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    candidates = ["torch_adamw_foreach", "torch_adamw_fused", "peft_riemannian", "adamw", "scaled_adamw"]
    # the baseline the speed targets are stated against (see the module docstring)
    baseline = "torch_adamw_fused" if args.device == "cuda" else "torch_adamw_foreach"
    hw = hardware_info()
    results = {}
    for case in cases:
        results[case] = bench_case(case, candidates, args.rounds, args.steps, args.device)
        warm = {c: statistics.median(t) * 1e3 for c, t in results[case]["warm"].items()}
        print(f"{case} (warm, ms): " + ", ".join(f"{c} {t:.2f}" for c, t in warm.items()), flush=True)
    lines = [
        f"# optimizer step time ({args.device}; {hw['gpu'] or hw['cpu']}, {hw['threads']} threads, torch "
        f"{hw['torch']}); median [IQR], {args.rounds} rounds of {args.steps} steps per candidate",
        f"# command: python benchmarks/optimizer_step.py {' '.join(argv if argv is not None else sys.argv[1:])}",
    ]
    for kind, what in (("warm", "2nd and later steps of each round"), ("cold", "first step of each round")):
        lines += ["", f"## {kind}: {what}", ""]
        lines += table({case: results[case][kind] for case in cases}, candidates, baseline)
    speed = matmul_flops_per_second(args.device)
    lines += [
        "",
        f"## compute floor: the preconditioner's products (a lower bound on their GFLOP) at the {speed / 1e9:.0f} "
        "GFLOP/s of a 2048² float32 matmul",
        "",
        f"| case | GFLOP per step | floor | floor / {baseline} (warm) |",
        "|---|---|---|---|",
    ]
    for case in cases:
        flops = preconditioner_flops(case)
        base = statistics.median(results[case]["warm"][baseline])
        lines.append(f"| {case} | {flops / 1e9:.3f} | {flops / speed * 1e3:.2f} ms | {flops / speed / base:.2f}x |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
