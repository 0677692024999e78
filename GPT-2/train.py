"""LoRA fine-tuning on E2E NLG with the paper's optimizers: train, select on validation, beam-decode, score.

    python GPT-2/train.py optim=adamw                                    # the paper recipe (GPT-2 medium)
    python GPT-2/train.py preset=smollm2_cpu optim=scaled_adamw          # CPU-sized reproduction
    python GPT-2/train.py -m preset=smollm2_cpu sweep=lr_adamw_vs_scaled_adamw
    torchrun --nproc_per_node 4 GPT-2/train.py optim=scaled_adamw       # 4 processes (DDP; gloo on a CPU)

Config: GPT-2/conf/config.yaml (every default commented there). Before anything is loaded, everything that could
fail after training is checked (:func:`preflight`: the data files, the model files, java and the METEOR jar when
the run will score, a writable results folder). The run's record ``<results_dir>/gpt2_e2e/<run_name>.json`` is on
disk from the start (``status: running``; config, per-step loss and time, validation losses as they come, then the
five E2E metrics) and the decoded test outputs go to ``<results_dir>/gpt2_e2e/predictions/<record name>.tsv``
(columns MR, output) before scoring. If scoring fails, the record keeps the training results and names the
predictions (``status: failed``); ``python GPT-2/evaluate.py --record <record>`` scores them later.
With ``checkpoint.every=N`` a checkpoint every N steps goes to ``<results_dir>/gpt2_e2e/checkpoints/<run_name>/``,
which ``resume=true`` continues from.
``main()`` returns the test BLEU (or the best validation loss when decoding is off).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import e2e_metrics  # noqa: E402
import harness  # noqa: E402
from decoding import beam_decode  # noqa: E402
from e2e_data import E2EDataset, collate, load_splits, scored_test_set, split_paths  # noqa: E402
from lora_layers import apply_lora, count_trainable  # noqa: E402
from models import check_model_source, load_model  # noqa: E402
from harness import Rule  # noqa: E402

EXPERIMENT = "gpt2_e2e"


def lm_loss(model: torch.nn.Module, batch: dict, label_smoothing: float = 0.0, accelerator=None) -> torch.Tensor:
    """Next-token cross-entropy on the target tokens (labels != -100), with label smoothing: their mean.

    With several processes (``accelerator``) the mean is over the global batch's target tokens: each rank returns
    its tokens' sum times the number of processes over the global count, so DDP's mean of the ranks' gradients
    and the mean of the ranks' losses are those of one process taking the whole global batch.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten()
    if accelerator is None or accelerator.num_processes == 1:
        return F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
    count = accelerator.reduce((targets != -100).sum(), reduction="sum")
    return total * accelerator.num_processes / count


def validation_batches(dataset, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's validation batches: consecutive batches of ``batch_size`` (the global batch), every
    ``world_size``-th one from the ``rank``-th, each evaluated whole by one rank, so the validation loss does not
    depend on the number of processes."""
    starts = range(rank * batch_size, len(dataset), world_size * batch_size)
    return [list(range(start, min(start + batch_size, len(dataset)))) for start in starts]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, loader: torch.utils.data.DataLoader, accelerator=None) -> float:
    """Plain (unsmoothed) target-token loss, the mean over the validation batches: the validation criterion.

    With several processes each takes its share of the batches (``validation_batches``) and the sums and counts
    are all-reduced.
    """
    model.eval()
    device = accelerator.device if accelerator is not None else None
    losses = [lm_loss(model, {k: v.to(device) for k, v in batch.items()} if device else batch).item()
              for batch in loader]
    model.train()
    if accelerator is None or accelerator.num_processes == 1:
        return sum(losses) / len(losses)
    total = accelerator.reduce(torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device), "sum")
    return (total[0] / total[1]).item()


# Settings used only after training (decoding, the scored test MRs): a run that changes only these shares the
# training of the run before it, and resume=true continues that finished training and redoes what follows it.
AFTER_TRAINING = ("decode", "data.test_mrs")

# Every number and choice this experiment reads, the decoding ones included (used only after training), checked
# before anything is loaded (harness.check_settings).
SETTINGS = (
    *harness.TRAINING_RULES,
    Rule("train.epochs", "int", minimum=1),
    Rule("train.max_steps", "int", minimum=1, none=True, none_means="all epochs"),
    Rule("train.warmup_steps", "int", minimum=0),
    Rule("train.label_smoothing", "float", minimum=0, maximum=0.999999),
    Rule("train.eval_every", "int", minimum=1, none=True, none_means="once per epoch"),
    Rule("data.max_length", "int", minimum=2),
    Rule("data.holdout_mrs", "int", minimum=0),
    Rule("data.train_examples", "int", minimum=1, none=True, none_means="all"),
    Rule("data.validation_examples", "int", minimum=1, none=True, none_means="all"),
    Rule("data.test_mrs", "int", minimum=0, none=True, none_means="all; 0: no decoding"),
    Rule("decode.num_beams", "int", minimum=1),
    Rule("decode.length_penalty", "float"),
    Rule("decode.no_repeat_ngram_size", "int", minimum=0),
    Rule("decode.max_new_tokens", "int", minimum=1),
    Rule("decode.batch_size", "int", minimum=1),
)


def check_config(cfg: DictConfig) -> None:
    """Fail before loading anything on a config that cannot run: every setting (:data:`SETTINGS`), the optimizer
    and its LoRA placement."""
    harness.check_settings(cfg, SETTINGS)
    if cfg.optim.name not in harness.ALL_OPTIMIZERS:
        raise ValueError(f"unknown optimizer optim.name={cfg.optim.name!r}; "
                         f"expected one of {list(harness.ALL_OPTIMIZERS)}")
    if cfg.optim.name in ("peft_riemannian", "lora_rite") and cfg.lora.placement != "peft":
        raise ValueError(f"optimizer {cfg.optim.name!r} needs PEFT LoRA modules: set lora.placement=peft "
                         f"(got {cfg.lora.placement!r})")


def will_score(cfg: DictConfig) -> bool:
    """Whether the run decodes and scores test MRs (``data.test_mrs`` null: all of them; 0: none)."""
    return cfg.data.test_mrs is None or int(cfg.data.test_mrs) > 0


def preflight(cfg: DictConfig) -> None:
    """Everything that could fail after training, checked before anything is loaded: the config, the data files
    (under ``data.root``), the model files, java and the METEOR jar when the run will score, and a writable
    results folder. Each failure is a clear error naming the problem."""
    check_config(cfg)
    split_paths(cfg.data)
    check_model_source(cfg.model)
    if will_score(cfg):
        e2e_metrics.check_scorer()
    harness.require_writable_folder(Path(cfg.results_dir) / EXPERIMENT / "predictions", "results folder")


def make_recorder(cfg: DictConfig, launch: dict | None = None) -> harness.RunRecorder:
    """The run's record (``<results_dir>/gpt2_e2e/<run_name>.json``; the default name from the resolved config and
    ``launch``, :func:`harness.launch_info`: several processes add it and the ``world_size`` tag)."""
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    launch = launch or {}
    return harness.RunRecorder(
        cfg.results_dir, experiment=EXPERIMENT, optimizer=cfg.optim.name,
        hparams={k: v for k, v in optim_cfg.items() if k != "name"}, seed=int(cfg.seed),
        config=OmegaConf.to_container(cfg, resolve=True), launch=launch,
        tags=harness.record_tags(OmegaConf.to_container(cfg.tags, resolve=True), launch),
        run_name=cfg.run_name, wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb else None,
        resume=cfg.resume, after_training=AFTER_TRAINING,
    )  # fmt: skip


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    accelerator = harness.make_accelerator()  # stops on a launch that would not join its processes
    launch = harness.launch_info(accelerator.num_processes, int(cfg.train.batch_size))
    recorder = make_recorder(cfg, launch) if accelerator.is_main_process else None
    if harness.skip_finished(cfg.skip_finished, recorder):  # skip_finished=true: a finished configuration stops here
        return math.nan
    if recorder is not None:
        recorder.check_can_start()  # another run of this configuration stops here, before anything is loaded
    # resume=true/false and the checkpoints of this run are checked now, before anything is loaded
    checkpointer = harness.Checkpointer.from_config(cfg, harness.checkpoint_folder(recorder), accelerator,
                                                    after_training=AFTER_TRAINING)
    return run(cfg, accelerator, recorder, checkpointer)


def run(cfg: DictConfig, accelerator, recorder: harness.RunRecorder | None,
        checkpointer: harness.Checkpointer) -> float:
    """Load, train, select on validation, decode, score; ``recorder`` is None on the processes that do not write.
    The record is on disk (running) from the first training step on, and closed however the run ends."""
    harness.seed_everything(int(cfg.seed))
    splits = load_splits(cfg.data)
    model, tokenizer = load_model(cfg.model)
    model = apply_lora(model, cfg.lora)
    n_trainable = count_trainable(model)

    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    # Each process takes batch_size examples a step; accelerate gives rank r the batches r, r + N, ... of this
    # loader, so a step's global batch is the one-process run's batch of N * batch_size (same shuffled order).
    train_set = harness.ResumableDataset(E2EDataset(splits["train"], tokenizer, int(cfg.data.max_length)))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=int(cfg.train.batch_size), collate_fn=collate_fn, shuffle=True,
        generator=torch.Generator().manual_seed(int(cfg.seed)))
    valid_set = E2EDataset(splits["validation"], tokenizer, int(cfg.data.max_length))
    valid_loader = torch.utils.data.DataLoader(valid_set, collate_fn=collate_fn, batch_sampler=validation_batches(
        valid_set, int(cfg.train.batch_size) * accelerator.num_processes, accelerator.process_index,
        accelerator.num_processes))
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    optimizer = harness.build_optimizer(model, **optim_cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    total_steps = cfg.train.max_steps or int(cfg.train.epochs) * len(train_loader)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_steps), total_steps)

    with recorder or contextlib.nullcontext():  # on disk (running) from here, closed however the run ends
        best = {"loss": math.inf, "step": None, "state": None}
        checkpointer.register(best=best)  # model selection's state is part of a checkpoint

        def evaluate(step: int) -> dict[str, float]:
            """Validation loss; keep the trainable state with the lowest one (model selection)."""
            loss = mean_loss(accelerator.unwrap_model(model), valid_loader, accelerator)  # the same on every rank
            if loss < best["loss"]:
                best.update(loss=loss, step=step, state=harness.trainable_state(accelerator.unwrap_model(model)))
            return {"valid_loss": loss}

        eval_every = int(cfg.train.eval_every or len(train_loader))
        losses = harness.train_loop(
            model, optimizer, train_loader,
            partial(lm_loss, label_smoothing=float(cfg.train.label_smoothing), accelerator=accelerator),
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

        final = {"trainable_params": n_trainable, "steps": len(losses),
                 "train_loss_last": losses[-1] if losses else None,
                 "valid_loss_best": best["loss"] if best["state"] is not None else None, "best_step": best["step"]}
        recorder.save(final_metrics=final)  # the training results are on disk before decoding and scoring
        mrs, refs = scored_test_set(splits["test"], cfg.data.test_mrs)
        if mrs and best["state"] is not None:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.load_state_dict(best["state"], strict=False)
            start = time.perf_counter()
            hyps = beam_decode(unwrapped, tokenizer, mrs, num_beams=int(cfg.decode.num_beams),
                               length_penalty=float(cfg.decode.length_penalty),
                               no_repeat_ngram_size=int(cfg.decode.no_repeat_ngram_size),
                               max_new_tokens=int(cfg.decode.max_new_tokens), batch_size=int(cfg.decode.batch_size))
            final["decode_time_s"] = time.perf_counter() - start
            with recorder.output_file("predictions", ".tsv") as tmp:  # atomic, named after the record, listed in it
                e2e_metrics.write_predictions(tmp, mrs, hyps)
            start = time.perf_counter()
            try:
                final.update(e2e_metrics.score_corpus(hyps, refs))
            except Exception:
                print(f"scoring failed: {recorder.write_path} keeps the training results and names the "
                      f"predictions; score them later with: python GPT-2/evaluate.py --record {recorder.write_path}",
                      file=sys.stderr)
                raise
            final["score_time_s"] = time.perf_counter() - start
            final["test_mrs"] = len(mrs)
        path = recorder.finish(final_metrics=final)
        print(f"record: {path}\n" + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in final.items()))
        return final.get("BLEU", final["valid_loss_best"])


if __name__ == "__main__":
    main()
