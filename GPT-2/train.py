"""LoRA fine-tuning on E2E NLG with the paper's optimizers: train, select on validation, beam-decode, score.

    python GPT-2/train.py optim=adamw                                    # the paper recipe (GPT-2 medium)
    python GPT-2/train.py preset=smollm2_cpu optim=scaled_adamw          # CPU-sized reproduction
    python GPT-2/train.py -m preset=smollm2_cpu sweep=lr_adamw_vs_scaled_adamw
    accelerate launch GPT-2/train.py optim=scaled_adamw                  # multi-GPU (DDP)

Config: GPT-2/conf/config.yaml (every default commented there). Writes one record per run to
``<results_dir>/gpt2_e2e/<run_name>.json`` (config, per-step loss and time, validation losses, the five E2E
metrics) and the decoded test outputs to ``<results_dir>/gpt2_e2e/predictions/<run_name>.tsv`` (columns MR, output);
with ``checkpoint.every=N`` a checkpoint every N steps to ``<results_dir>/gpt2_e2e/checkpoints/<run_name>/``, which
``resume=true`` continues from.
``main()`` returns the test BLEU (or the best validation loss when decoding is off).
"""

from __future__ import annotations

import csv
import math
import sys
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import harness  # noqa: E402
from decoding import beam_decode  # noqa: E402
from e2e_data import E2EDataset, collate, even_subset, group_by_mr, load_splits  # noqa: E402
from lora_layers import apply_lora, count_trainable  # noqa: E402
from models import load_model  # noqa: E402

EXPERIMENT = "gpt2_e2e"


def lm_loss(model: torch.nn.Module, batch: dict, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the target tokens (labels != -100), with label smoothing."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, label_smoothing=label_smoothing)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    """Plain (unsmoothed) target-token loss over a loader: the validation criterion."""
    model.eval()
    losses = [lm_loss(model, batch).item() for batch in loader]
    model.train()
    return sum(losses) / len(losses)


def check_config(cfg: DictConfig) -> None:
    """Fail before loading anything on a config that cannot run."""
    if cfg.optim.name not in harness.ALL_OPTIMIZERS:
        raise ValueError(f"unknown optimizer optim.name={cfg.optim.name!r}; "
                         f"expected one of {list(harness.ALL_OPTIMIZERS)}")
    if cfg.optim.name in ("peft_riemannian", "lora_rite") and cfg.lora.placement != "peft":
        raise ValueError(f"optimizer {cfg.optim.name!r} needs PEFT LoRA modules: set lora.placement=peft "
                         f"(got {cfg.lora.placement!r})")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    from accelerate import Accelerator

    accelerator = Accelerator()
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    hparams = {k: v for k, v in optim_cfg.items() if k != "name"}
    recorder = harness.RunRecorder(
        cfg.results_dir, experiment=EXPERIMENT, optimizer=cfg.optim.name, hparams=hparams, seed=int(cfg.seed),
        config=OmegaConf.to_container(cfg, resolve=True), tags=OmegaConf.to_container(cfg.tags, resolve=True),
        run_name=cfg.run_name, wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb else None,
    ) if accelerator.is_main_process else None
    # resume=true/false and the checkpoints of this run are checked now, before anything is loaded
    checkpointer = harness.Checkpointer.from_config(cfg, harness.checkpoint_folder(recorder), accelerator)
    harness.seed_everything(int(cfg.seed))
    splits = load_splits(cfg.data)
    model, tokenizer = load_model(cfg.model)
    model = apply_lora(model, cfg.lora)
    n_trainable = count_trainable(model)

    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    make_loader = partial(torch.utils.data.DataLoader, batch_size=int(cfg.train.batch_size), collate_fn=collate_fn)
    train_set = harness.ResumableDataset(E2EDataset(splits["train"], tokenizer, int(cfg.data.max_length)))
    train_loader = make_loader(train_set, shuffle=True, generator=torch.Generator().manual_seed(int(cfg.seed)))
    valid_loader = make_loader(E2EDataset(splits["validation"], tokenizer, int(cfg.data.max_length)))
    optimizer = harness.build_optimizer(model, **optim_cfg)
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, optimizer, train_loader, valid_loader)
    total_steps = cfg.train.max_steps or int(cfg.train.epochs) * len(train_loader)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_steps), total_steps)

    best = {"loss": math.inf, "step": None, "state": None}
    checkpointer.register(best=best)  # model selection's state is part of a checkpoint

    def evaluate(step: int) -> dict[str, float]:
        """Validation loss; keep the trainable state with the lowest one (model selection)."""
        local = torch.tensor(mean_loss(model, valid_loader), device=accelerator.device)
        loss = accelerator.reduce(local, reduction="mean").item()  # the mean over processes under DDP
        if loss < best["loss"]:
            best.update(loss=loss, step=step, state=harness.trainable_state(accelerator.unwrap_model(model)))
        return {"valid_loss": loss}

    eval_every = int(cfg.train.eval_every or len(train_loader))
    losses = harness.train_loop(
        model, optimizer, train_loader, partial(lm_loss, label_smoothing=float(cfg.train.label_smoothing)),
        scheduler=scheduler, max_steps=cfg.train.max_steps, epochs=int(cfg.train.epochs),
        grad_clip=cfg.train.grad_clip, accelerator=accelerator, recorder=recorder,
        desc=f"train {cfg.optim.name} lr={cfg.optim.lr:g}", eval_fn=evaluate, eval_every=eval_every,
        stop_on_divergence=True, checkpointer=checkpointer,
    )
    planned = min(cfg.train.max_steps or math.inf, int(cfg.train.epochs) * len(train_loader))
    diverged = len(losses) < planned  # train_loop stopped early (stop_on_divergence); the same on every process
    if losses and len(losses) % eval_every and not diverged:  # the final state was not evaluated yet
        metrics = evaluate(len(losses))
        if recorder is not None:
            recorder.log_metrics(len(losses), **metrics)
    if not accelerator.is_main_process:
        return best["loss"]

    final = {"trainable_params": n_trainable, "steps": len(losses), "train_loss_last": losses[-1] if losses else None,
             "valid_loss_best": best["loss"] if best["state"] is not None else None, "best_step": best["step"]}
    mrs, refs = group_by_mr(splits["test"])
    keep = even_subset(len(mrs), cfg.data.test_mrs)
    if keep and best["state"] is not None:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.load_state_dict(best["state"], strict=False)
        hyps = beam_decode(unwrapped, tokenizer, [mrs[i] for i in keep], num_beams=int(cfg.decode.num_beams),
                           length_penalty=float(cfg.decode.length_penalty),
                           no_repeat_ngram_size=int(cfg.decode.no_repeat_ngram_size),
                           max_new_tokens=int(cfg.decode.max_new_tokens), batch_size=int(cfg.decode.batch_size))
        pred_path = recorder.path.parent / "predictions" / f"{recorder.path.stem}.tsv"
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        with pred_path.open("w", encoding="utf-8", newline="") as f:  # the TGen file's layout: MR, output
            csv.writer(f, delimiter="\t").writerows([("MR", "output")] + [(mrs[i], h) for i, h in zip(keep, hyps)])
        import e2e_metrics

        final.update(e2e_metrics.score_corpus(hyps, [refs[i] for i in keep]))
        final["test_mrs"] = len(keep)
    path = recorder.finish(final_metrics=final)
    print(f"record: {path}\n" + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in final.items()))
    return final.get("BLEU", final["valid_loss_best"])


if __name__ == "__main__":
    main()
