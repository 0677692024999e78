"""Mistral-7B (or any sequence classifier) + LoRA on a GLUE task with one of the optimizers inside HF's Trainer.

    python Mistral-7B/train.py task=rte optim=scaled_adamw            # the paper recipe (GPU, 4-bit NF4)
    python Mistral-7B/train.py preset=minilm_sst2 optim=adamw         # MiniLM-L6 + SST-2, ~1 min on a CPU
    python Mistral-7B/train.py task=mrpc optim=scaled_adamw --cfg job # lr 5e-5, reg 100 (conf/tables/paper.yaml)
    accelerate launch Mistral-7B/train.py task=qnli                   # several GPUs (data parallel)

The optimizer is `harness.build_optimizer(model, **cfg.optim)`, handed to an unmodified `Trainer` through
`optimizers=(optimizer, scheduler)`; the run is recorded by `harness.RecorderCallback` into
<results_dir>/glue/<run_name>.json. With `checkpoint.every=N` the Trainer saves checkpoint-<N> folders into
<results_dir>/glue/checkpoints/<run_name>/ (completed by `harness.TrainerCheckpoints`), which `resume=true`
continues from. `main()` returns the task's Table-2 metric on the (first) dev split.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness
import config_groups  # noqa: E402
import glue_data  # noqa: E402
from glue_metrics import compute_metrics_fn, primary_metric  # noqa: E402

from core import NonFiniteGradientError  # noqa: E402
from harness import (  # noqa: E402
    RecorderCallback, RunRecorder, TrainerCheckpoints, build_optimizer, checkpoint_folder, seed_everything,
)  # fmt: skip

EXPERIMENT = "glue"
config_groups.register_config_groups()  # task, table and tuned/<table>_<task>_<optim> (conf/tables/*.yaml)


def nf4_config():
    """4-bit NF4 weights with bf16 compute (bitsandbytes), as in the paper."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantize=true needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                          "use quantize=false to load the model unquantized")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=False)


def load_model(cfg: DictConfig, num_labels: int):
    """Tokenizer and LoRA-wrapped sequence classifier (optionally 4-bit quantized)."""
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    dtype = getattr(torch, str(cfg.model.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype must name a torch dtype (float32, bfloat16, ...), got {cfg.model.dtype!r}")
    kwargs = {"num_labels": num_labels, "dtype": dtype}
    if cfg.quantize:
        kwargs.update(quantization_config=nf4_config(), device_map={"": PartialState().local_process_index})
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path, **kwargs)
    if cfg.model.pad_token == "eos":  # Mistral has no pad token
        if tokenizer.eos_token is None:
            raise ValueError(f"model.pad_token=eos but {cfg.model.name_or_path} has no eos token; use null")
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.eos_token_id
    elif cfg.model.pad_token is not None:
        raise ValueError(f"model.pad_token must be 'eos' or null, got {cfg.model.pad_token!r}")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      target_modules=list(cfg.lora.target_modules), task_type=cfg.lora.task_type)
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    return tokenizer, model


def load_data(cfg: DictConfig, tokenizer):
    """Tokenised train split and dev splits ({split name: dataset})."""
    task = cfg.task.name
    raw = glue_data.load_glue(task, root=cfg.data.root, hub_id=cfg.data.hub_id)
    raw["train"] = glue_data.subsample(raw["train"], cfg.data.max_train_samples, cfg.seed)
    splits = glue_data.eval_splits(task)
    for split in splits:
        raw[split] = glue_data.subsample(raw[split], cfg.data.max_eval_samples, cfg.seed)
    data = glue_data.tokenize(raw, tokenizer, cfg.data.max_length)
    return data["train"], {split: data[split] for split in splits}


def total_steps(cfg: DictConfig, n_train: int, world_size: int) -> int:
    """Optimizer steps of the whole run (what the LR schedule spans)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_train / (cfg.train.batch_size * world_size)) // cfg.train.grad_accum
    return max(1, per_epoch) * cfg.train.epochs


def final_metrics(metrics_by_split: dict[str, dict]) -> dict[str, float]:
    """Trainer's eval dicts -> flat record metrics: the first dev split unprefixed, the others prefixed
    by their short name (mnli: accuracy = matched, mismatched_accuracy)."""
    out = {}
    for i, (split, metrics) in enumerate(metrics_by_split.items()):
        prefix = "" if i == 0 else split.replace("validation_", "") + "_"
        for key, value in metrics.items():
            name = key.removeprefix(f"eval_{split}_").removeprefix("eval_")
            if name in ("runtime", "samples_per_second", "steps_per_second", "epoch"):
                continue
            out[prefix + ("eval_loss" if name == "loss" else name)] = float(value)
    return out


def train(cfg: DictConfig) -> float:
    """Fine-tune, evaluate, record; returns the task's Table-2 metric on the first dev split."""
    from accelerate import PartialState
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, get_scheduler

    task = cfg.task.name
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    processes = PartialState()
    recorder = None
    if processes.is_main_process:
        hparams = {k: v for k, v in optim.items() if k != "name"}
        recorder = RunRecorder(
            cfg.results_dir, experiment=EXPERIMENT, optimizer=optim["name"],
            hparams=hparams, seed=cfg.seed, config=OmegaConf.to_container(cfg, resolve=True),
            tags=OmegaConf.to_container(cfg.tags, resolve=True), run_name=cfg.run_name or None,
            wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb else None)
    # resume=true/false and the checkpoints of this run are checked now, before anything is loaded
    checkpoints = TrainerCheckpoints.from_config(cfg, checkpoint_folder(recorder), world_size=processes.num_processes,
                                                 main=processes.is_main_process)
    seed_everything(cfg.seed)
    tokenizer, model = load_model(cfg, glue_data.num_labels(task))
    train_set, eval_sets = load_data(cfg, tokenizer)
    print(f"{task}: {len(train_set)} train, " + ", ".join(f"{len(d)} {s}" for s, d in eval_sets.items()))

    args = TrainingArguments(
        **checkpoints.training_arguments(cfg.train.logging_steps, cfg.output_dir), report_to="none", seed=cfg.seed,
        per_device_train_batch_size=cfg.train.batch_size, per_device_eval_batch_size=cfg.train.eval_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, logging_steps=cfg.train.logging_steps,
        eval_strategy=cfg.train.eval_strategy, bf16=cfg.train.bf16,
        dataloader_num_workers=cfg.train.num_workers, use_cpu=cfg.train.use_cpu)
    optimizer = build_optimizer(model, **optim)
    steps = total_steps(cfg, len(train_set), args.world_size)
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_training_steps=steps,
                              num_warmup_steps=math.ceil(cfg.train.warmup_ratio * steps))
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_sets,
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics_fn(task), optimizers=(optimizer, scheduler))

    if recorder is not None:
        trainer.add_callback(RecorderCallback(recorder))
    if checkpoints.every:
        trainer.add_callback(checkpoints.callback(recorder))  # completes each checkpoint-<N> the Trainer saves
    checkpoints.restore_record(recorder)

    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoints.resume_from) if checkpoints.resume_from else None)
        summary = {"train_loss": checkpoints.run_training_loss(result.training_loss, trainer.state.global_step),
                   "train_runtime_s": result.metrics["train_runtime"]}
    except NonFiniteGradientError as err:  # an LR sweep reports such a run as diverged instead of dropping it
        print(f"diverged at step {trainer.state.global_step + 1}: {err}")
        summary = {"diverged_at_step": trainer.state.global_step + 1}
    evals = {split: trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"eval_{split}")
             for split, ds in eval_sets.items()}
    metrics = {**final_metrics(evals), **summary, "train_samples": len(train_set),
               "steps": trainer.state.global_step}
    key = primary_metric(task)
    print(f"{task} {optim['name']} lr={optim['lr']:g}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if recorder is not None:
        print(f"record: {recorder.finish(final_metrics=metrics)}")
    return metrics[key]


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
