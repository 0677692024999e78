"""Runtime benchmark: wall-clock per training step of the four optimizers at LoRA rank 4 and 256 on GPT-2 medium.

The paper's runtime figure. Needs no pretrained weights: a randomly initialised GPT-2 of the shape in
``<data root>/gpt2-tokenizer/gpt2-medium-config.json`` with merged q/v LoRA on ``c_attn`` (as in train.py),
random token batches. Each (optimizer, rank) case runs ``--warmup`` untimed steps and ``--steps`` timed ones and
writes a record ``<results_dir>/gpt2_runtime/<optimizer>_..._r-<r>.json`` with per-step ``time_s`` (whole step)
and ``opt_time_s`` (optimizer step alone).

    python GPT-2/runtime.py                                  # CPU: short (batch 1, seq 64, 3 timed steps)
    python GPT-2/runtime.py --device cuda --batch 8 --seq 512 --steps 20   # on a GPU, the paper's shape
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import harness  # noqa: E402
from lora_layers import apply_lora, count_trainable  # noqa: E402
from models import build_config_model  # noqa: E402

EXPERIMENT = "gpt2_runtime"
HERE = Path(__file__).resolve().parent


def optim_preset(name: str) -> dict:
    """The optimizer's paper preset from conf/optim/<name>.yaml (name and hparams)."""
    return OmegaConf.to_container(OmegaConf.load(HERE / "conf" / "optim" / f"{name}.yaml"))


def bench_case(name: str, r: int, args: argparse.Namespace) -> Path:
    """Time one optimizer at one rank; write and return its record."""
    harness.seed_everything(args.seed)
    model_cfg = OmegaConf.create({"config_file": str(args.config), "config": {"n_layer": args.layers} if args.layers
                                  else None})
    model = build_config_model(model_cfg)
    lora_cfg = OmegaConf.create({"placement": "merged_qv", "target_modules": ["c_attn"],
                                 "enable_lora": [True, False, True], "r": r, "alpha": 32, "dropout": 0.1})
    model = apply_lora(model, lora_cfg).to(args.device)
    preset = optim_preset(name)
    optimizer = harness.build_optimizer(model, **preset)
    vocab = model.config.vocab_size
    batches = [{"input_ids": torch.randint(vocab, (args.batch, args.seq), device=args.device)}
               for _ in range(args.warmup + args.steps)]

    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    harness.train_loop(model, optimizer, batches[:args.warmup], loss_fn, desc=f"warm-up {name} r={r}")
    tags = {"r": r, "batch": args.batch, "seq": args.seq, "device": args.device}
    if args.layers:
        tags["layers"] = args.layers
    # timings depend on the CPU threads: they enter the record's name through `launch` (the config's `threads`
    # key is left out of the hash, as for every experiment whose results do not depend on it)
    recorder = harness.RunRecorder(args.results_dir, EXPERIMENT, name, {k: v for k, v in preset.items() if k != "name"},
                                   args.seed, config=vars(args) | {"r": r}, tags=tags,
                                   launch={"threads": torch.get_num_threads()})
    with recorder:
        harness.train_loop(model, optimizer, batches[args.warmup:], loss_fn, recorder=recorder,
                           desc=f"time {name} r={r}")
        opt_times = sorted(s["opt_time_s"] for s in recorder.record.steps)
        path = recorder.finish({"trainable_params": count_trainable(model),
                                "opt_time_s": opt_times[len(opt_times) // 2]})
    print(f"{name:>13} r={r:<4} step {recorder.record.step_time_s:.4f} s  "
          f"optimizer {opt_times[len(opt_times) // 2]:.5f} s")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=harness.default_data_root() / "gpt2-tokenizer" /
                        "gpt2-medium-config.json", help="GPT-2 config JSON (default: gpt2-medium's)")
    parser.add_argument("--optimizers", nargs="+", default=list(harness.OPTIMIZER_NAMES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 256])
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (paper: 8)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (paper: 512)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    parser.add_argument("--layers", type=int, default=None, help="override n_layer (default: the config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=110)
    parser.add_argument("--results-dir", type=Path, default=harness.REPO_ROOT / "results")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.optimizers) - set(harness.ALL_OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; expected some of {list(harness.ALL_OPTIMIZERS)}")
    if not args.config.is_file():
        parser.error(f"--config {args.config} not found")
    harness.require_writable_folder(args.results_dir / EXPERIMENT, "--results-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    return [bench_case(name, r, args) for r in args.ranks for name in args.optimizers]


if __name__ == "__main__":
    main()
