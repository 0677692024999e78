"""Mistral-7B (or any sequence classifier) + LoRA on a GLUE task with one of the optimizers inside HF's Trainer.

    python Mistral-7B/train.py task=rte optim=scaled_adamw            # the paper recipe (GPU, 4-bit NF4)
    python Mistral-7B/train.py preset=minilm_sst2 optim=adamw         # MiniLM-L6 + SST-2, ~1 min on a CPU
    python Mistral-7B/train.py task=mrpc optim=scaled_adamw --cfg job # lr 5e-5, reg 100 (conf/tables/paper.yaml)
    torchrun --nproc_per_node 4 Mistral-7B/train.py task=qnli         # 4 processes (DDP; gloo on a CPU)

The optimizer is `harness.build_optimizer(model, **cfg.optim)`, built by an unmodified `Trainer` through
`optimizer_cls_and_kwargs=(core.trainer_optimizer(name, build=harness.build_optimizer), hparams)` over the model it
trains (the route Trainer also takes under FSDP), with Trainer's own scheduler (`train.scheduler`,
`train.warmup_ratio`); the run is recorded by `harness.RecorderCallback` into
<results_dir>/glue/<run_name>.json, on disk from the start of training (`status: running`, rewritten at every
evaluation and checkpoint) and closed however the run ends. With `checkpoint.every=N` the Trainer saves
checkpoint-<N> folders into <results_dir>/glue/checkpoints/<run_name>/ (completed by `harness.TrainerCheckpoints`),
which `resume=true` continues from. Before anything is loaded, `preflight` checks what could
fail after training (the data files, a local model folder, bitsandbytes, writable results and output folders).
`main()` returns the task's Table-2 metric on the (first) dev split.
"""
from __future__ import annotations

import contextlib
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

from core import NonFiniteGradientError, trainer_optimizer  # noqa: E402
from harness import (  # noqa: E402
    RUN_RULES, RecorderCallback, Rule, RunRecorder, TrainerCheckpoints, build_optimizer, check_launch, check_settings,
    checkpoint_folder, is_local_path, launch_info, needs_cpu_backend, record_tags, require_path,
    require_writable_folder, seed_everything, skip_finished,
)  # fmt: skip

EXPERIMENT = "glue"
config_groups.register_config_groups()  # task, table and tuned/<table>_<task>_<optim> (conf/tables/*.yaml)


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantize=true needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
                          "use quantize=false to load the model unquantized")


def nf4_config():
    """4-bit NF4 weights with bf16 compute (bitsandbytes), as in the paper."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=False)


# Every number and choice this experiment reads, checked before anything is loaded (harness.check_settings).
SETTINGS = (
    *RUN_RULES,
    Rule("train.batch_size", "int", minimum=1), Rule("train.eval_batch_size", "int", minimum=1),
    Rule("train.grad_accum", "int", minimum=1),
    Rule("train.epochs", "float", above=0),
    Rule("train.max_steps", "int", minimum=1, also=(-1,)),  # -1: Trainer's "no step limit" (the epochs decide)
    Rule("train.warmup_ratio", "float", minimum=0, maximum=0.999999),
    Rule("train.max_grad_norm", "float", above=0, none=True, none_means="no clipping"),
    Rule("train.logging_steps", "int", minimum=1),
    Rule("train.eval_steps", "int", minimum=1, none=True, none_means="Trainer's default"),
    Rule("train.eval_strategy", "choice", choices=("no", "steps", "epoch")),
    Rule("train.num_workers", "int", minimum=0),
    Rule("data.max_length", "int", minimum=1, none=True, none_means="the tokenizer's limit"),
    Rule("data.max_train_samples", "int", minimum=1, none=True, none_means="all"),
    Rule("data.max_eval_samples", "int", minimum=1, none=True, none_means="all"),
)


def preflight(cfg: DictConfig) -> None:
    """Everything that could fail after training, checked before anything is loaded: every setting
    (:data:`SETTINGS`), the task's data files (under ``data.root``), a local model folder, bitsandbytes for
    ``quantize``, writable results and output folders."""
    check_settings(cfg, SETTINGS)
    if cfg.data.root is not None:
        glue_data.split_files(cfg.data.root, cfg.task.name)
    if is_local_path(cfg.model.name_or_path):
        require_path(cfg.model.name_or_path, "model.name_or_path")
    check_quantize(cfg)
    require_writable_folder(Path(cfg.results_dir) / EXPERIMENT, "results folder")
    require_writable_folder(cfg.output_dir, "output_dir (the Trainer's scratch folder)")


def check_quantize(cfg: DictConfig) -> None:
    """quantize=true needs bitsandbytes and a CUDA GPU (the 4-bit weights are placed on this process's GPU):
    stop with a clear message before anything is loaded where either is missing."""
    if not cfg.quantize:
        return
    gpu = "train.use_cpu=true" if cfg.train.use_cpu else None if torch.cuda.is_available() else "no CUDA GPU is visible"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantize=true needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; bitsandbytes "
                          f"is not installed{f' and {gpu}' if gpu else ''}. Use quantize=false to load the model "
                          "unquantized")
    if gpu:
        raise RuntimeError(f"quantize=true needs a CUDA GPU for the 4-bit NF4 weights, but {gpu}; use quantize=false "
                           "to load the model unquantized")


def model_dtype(cfg: DictConfig) -> torch.dtype:
    """The torch dtype named by `cfg.model.dtype`."""
    dtype = getattr(torch, str(cfg.model.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype must name a torch dtype (float32, bfloat16, ...), got {cfg.model.dtype!r}")
    return dtype


def model_kwargs(cfg: DictConfig, num_labels: int) -> dict:
    """The keyword arguments of `from_pretrained` for the classifier: labels, dtype and the 4-bit config."""
    kwargs = {"num_labels": num_labels, "dtype": model_dtype(cfg)}
    if cfg.quantize:
        from accelerate import PartialState

        kwargs.update(quantization_config=nf4_config(), device_map={"": PartialState().local_process_index})
    return kwargs


def set_pad_token(cfg: DictConfig, tokenizer, model) -> None:
    """model.pad_token=eos: pad with the eos token (Mistral has no pad token); null keeps the tokenizer's."""
    if cfg.model.pad_token == "eos":
        if tokenizer.eos_token is None:
            raise ValueError(f"model.pad_token=eos but {cfg.model.name_or_path} has no eos token; use null")
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.eos_token_id
    elif cfg.model.pad_token is not None:
        raise ValueError(f"model.pad_token must be 'eos' or null, got {cfg.model.pad_token!r}")


def add_lora(cfg: DictConfig, model):
    """The PEFT LoRA of `cfg.lora` on `model` (task_type SEQ_CLS also trains the classifier head)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                      target_modules=list(cfg.lora.target_modules), task_type=cfg.lora.task_type,
                      use_rslora=bool(cfg.lora.get("rslora", False)))  # set by the rsLoRA sweep only
    return get_peft_model(model, lora)


def load_model(cfg: DictConfig, num_labels: int):
    """Tokenizer and LoRA-wrapped sequence classifier (optionally 4-bit quantized)."""
    check_quantize(cfg)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path,
                                                               **model_kwargs(cfg, num_labels))
    set_pad_token(cfg, tokenizer, model)
    model = add_lora(cfg, model)
    model.print_trainable_parameters()
    return tokenizer, model


def empty_model(cfg: DictConfig, num_labels: int, config=None):
    """The LoRA-wrapped classifier of `cfg` on the meta device (no weights are read or allocated), built from
    `config` (a transformers config; default: the one of `cfg.model.name_or_path`): the architecture, the LoRA
    factors and the trainable-parameter count of the full-size run, for checks on machines that cannot load it.
    The base layers stay unquantized (4-bit loading needs the weights and a GPU); the LoRA factors and the
    classifier head, the trainable part, have the same shapes either way."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = config if config is not None else AutoConfig.from_pretrained(cfg.model.name_or_path)
    config.num_labels = num_labels
    if cfg.model.pad_token == "eos":  # what set_pad_token does once the tokenizer is loaded
        config.pad_token_id = config.eos_token_id
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, dtype=model_dtype(cfg))
        return add_lora(cfg, model)


def load_data(cfg: DictConfig, tokenizer):
    """Tokenised train split and dev splits ({split name: dataset})."""
    task = cfg.task.name
    raw = glue_data.load_glue(task, root=cfg.data.root, hub_path=cfg.data.hub_path)
    raw["train"] = glue_data.subsample(raw["train"], cfg.data.max_train_samples, cfg.seed)
    splits = glue_data.eval_splits(task)
    for split in splits:
        raw[split] = glue_data.subsample(raw[split], cfg.data.max_eval_samples, cfg.seed)
    data = glue_data.tokenize(raw, tokenizer, cfg.data.max_length)
    return data["train"], {split: data[split] for split in splits}


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
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    task = cfg.task.name
    preflight(cfg)
    check_launch()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    hparams = {k: v for k, v in optim.items() if k != "name"}
    use_cpu = bool(cfg.train.use_cpu or needs_cpu_backend())  # torchrun on a machine without CUDA: DDP over gloo
    processes = PartialState(cpu=use_cpu)  # joins the launched processes (as Trainer's would) for the shared names
    recorder = None
    if processes.is_main_process:
        launch = launch_info(processes.num_processes, cfg.train.batch_size, cfg.train.grad_accum)
        recorder = RunRecorder(
            cfg.results_dir, experiment=EXPERIMENT, optimizer=optim["name"],
            hparams=hparams, seed=cfg.seed, config=OmegaConf.to_container(cfg, resolve=True), launch=launch,
            tags=record_tags(OmegaConf.to_container(cfg.tags, resolve=True), launch), run_name=cfg.run_name or None,
            wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb else None, resume=cfg.resume)
    if skip_finished(cfg.skip_finished, recorder):  # skip_finished=true: a finished configuration stops here
        return math.nan
    if recorder is not None:
        recorder.check_can_start()  # another run of this configuration stops here, before anything is loaded
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
        eval_strategy=cfg.train.eval_strategy, eval_steps=cfg.train.eval_steps,
        bf16=cfg.train.bf16, dataloader_num_workers=cfg.train.num_workers,
        lr_scheduler_type=cfg.train.scheduler, warmup_steps=cfg.train.warmup_ratio,  # < 1: a fraction of the steps
        use_cpu=use_cpu)
    # Trainer builds it (build_optimizer(model, name, **hparams)) over the model it trains, then its scheduler
    factory = trainer_optimizer(optim["name"], build=build_optimizer)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_sets,
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics_fn(task), optimizer_cls_and_kwargs=(factory, hparams))

    if recorder is not None:
        trainer.add_callback(RecorderCallback(recorder))
    if checkpoints.every:
        trainer.add_callback(checkpoints.callback(recorder))  # completes each checkpoint-<N> the Trainer saves
    checkpoints.restore_record(recorder)

    with recorder or contextlib.nullcontext():  # on disk (running) from here, closed however the run ends
        try:
            resume_from = str(checkpoints.resume_from) if checkpoints.resume_from else None
            result = trainer.train(resume_from_checkpoint=resume_from)
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
