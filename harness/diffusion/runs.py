"""The run plumbing the two diffusion ``train.py`` share, reading their Hydra config.

:func:`preflight` (what could fail late, checked first), :func:`start_run` (seed, threads, accelerator, data and
results folders), :func:`load_lora_components`, :func:`concept_folder`, :func:`make_recorder` and
:func:`fuse_sample_and_finish` (fuse, sample, score, write the record and its samples). The config keys they
read: ``seed``, ``threads``, ``data.root``, ``results_dir``, ``tags`` (``preset``), ``wandb``, and the experiment's
own groups (``model``, ``lora``, ``concept``, ``train``, ``sample``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from ..distributed import launch_info, make_accelerator, record_tags
from ..paths import is_local_path, require_path, require_writable_folder
from ..records import RunRecorder
from ..seeding import seed_everything
from .data import _concept_files
from .models import (
    CONFIG_FILES, LoraDiffusionModel, SDComponents, add_lora, fuse_lora, load_components,
    random_init_tokenizer_source,
)
from ..settings import TRAINING_RULES, Rule, check_settings
from .sampling import SAMPLERS, make_sampler, sample_and_score, to_pil

__all__ = ["AFTER_TRAINING", "SETTINGS", "preflight", "start_run", "load_lora_components", "concept_folder",
           "make_recorder",
           "fuse_sample_and_finish"]  # fmt: skip


# Settings used only after training (fusion and sampling): a run that changes only these shares the training of
# the run before it, and resume=true continues that finished training and redoes what follows it.
AFTER_TRAINING = ("sample", "fusion_scale")

# Every number and choice the two diffusion experiments read, the sampling ones included (used only after
# training), checked before anything is loaded (harness.check_settings).
SETTINGS = (
    *TRAINING_RULES,
    Rule("train.steps", "int", minimum=1),
    Rule("train.lr_decay_steps", "int", minimum=1, none=True, none_means="train.steps"),
    Rule("train.mixed_precision", "choice", choices=("no", "fp16", "bf16")),
    Rule("train.stop_on_divergence", "bool"),
    Rule("train.noise_offset", "float", minimum=0),
    Rule("data.resolution", "int", minimum=8),
    Rule("lora.rank", "int", minimum=1),
    Rule("unet_lr", "float", above=0), Rule("text_lr", "float", above=0),
    Rule("unet_reg", "float", minimum=0), Rule("text_reg", "float", minimum=0),
    Rule("fusion_scale", "float"),
    Rule("sample.seeds", "int_list"),
    Rule("sample.steps", "int", minimum=1),
    Rule("sample.guidance_scale", "float", minimum=0),
    Rule("sample.sampler", "choice", choices=SAMPLERS),
    Rule("sample.black_threshold", "float", minimum=0, maximum=1),
)


def preflight(cfg, experiment: str) -> None:
    """Everything that could fail after training, checked before anything is loaded: every setting
    (:data:`SETTINGS`), the data folder, the concept images, the tiny model's tokenizer files (or a local Stable
    Diffusion folder; with ``model.random_init`` its configuration files and, without its ``tokenizer/``, the GPT-2
    tokenizer files), a local CLIP model, and a writable ``<results_dir>/<experiment>/samples`` folder. Each failure
    is a clear error naming the problem."""
    check_settings(cfg, SETTINGS)
    if cfg.data.root is None:
        raise ValueError("data.root is null: set it to the folder holding concepts/ and gpt2-tokenizer/ "
                         "(default ${data_root:}: $RPLORA_DATA or <repo>/../shared/data)")
    data_root = require_path(cfg.data.root, "data.root")
    _concept_files(concept_folder(cfg, data_root))
    if cfg.model.random_init and not cfg.model.pretrained:
        raise ValueError("model.random_init=true needs model.pretrained: the model (or folder of its config files) "
                         "whose architecture is built with random weights")
    if cfg.model.pretrained:
        if is_local_path(cfg.model.pretrained):
            folder = require_path(cfg.model.pretrained, "model.pretrained")
            if cfg.model.random_init:  # only the configuration files are read
                for part, file in CONFIG_FILES.items():
                    require_path(folder / part / file, f"model.pretrained's {part} configuration")
                if random_init_tokenizer_source(folder) == "gpt2_words":
                    require_path(cfg.model.gpt2_dir or Path(data_root) / "gpt2-tokenizer",
                                 "tokenizer folder model.gpt2_dir (model.pretrained has no tokenizer/)")
    else:
        require_path(cfg.model.gpt2_dir or Path(data_root) / "gpt2-tokenizer", "tokenizer folder model.gpt2_dir")
    if cfg.sample.clip_model and is_local_path(cfg.sample.clip_model):
        require_path(cfg.sample.clip_model, "sample.clip_model")
    require_writable_folder(Path(cfg.results_dir).expanduser() / experiment / "samples", "results folder")


def start_run(cfg, experiment: str) -> tuple[Accelerator, Path, Path]:
    """The opening of a diffusion run: :func:`preflight`, seed (``cfg.seed``), torch CPU threads (``cfg.threads``;
    null: torch's default), the accelerator (:func:`harness.make_accelerator`: the processes the launcher started,
    or a clear error); returns ``(accelerator, data_root, results_dir)`` = ``cfg.data.root``
    and ``cfg.results_dir`` as paths."""
    preflight(cfg, experiment)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision)
    return accelerator, Path(cfg.data.root).expanduser(), Path(cfg.results_dir).expanduser()


def load_lora_components(cfg, data_root: str | Path) -> SDComponents:
    """The components an experiment config names (``cfg.model``: ``pretrained`` or ``tiny``, ``random_init``,
    ``gpt2_dir``; seeded by ``cfg.seed``) with LoRA on the UNet and the text encoder (``cfg.lora``: targets,
    ``rank``, ``alpha``)."""
    gpt2_dir = cfg.model.gpt2_dir or Path(data_root) / "gpt2-tokenizer"
    tiny = OmegaConf.to_container(cfg.model.tiny, resolve=True) if cfg.model.tiny else None
    sd = load_components(cfg.model.pretrained, tiny, gpt2_dir, seed=cfg.seed, random_init=cfg.model.random_init)
    add_lora(sd.unet, cfg.lora.unet_targets, cfg.lora.rank, cfg.lora.alpha)
    add_lora(sd.text_encoder, cfg.lora.text_targets, cfg.lora.rank, cfg.lora.alpha)
    return sd


def concept_folder(cfg, data_root: str | Path) -> Path:
    """``cfg.concept.dir`` if given, else ``<data_root>/concepts/<cfg.concept.name>``; a clear error if absent."""
    folder = Path(cfg.concept.dir) if cfg.concept.dir else Path(data_root) / "concepts" / cfg.concept.name
    return require_path(folder, f"concept folder for '{cfg.concept.name}'")


def make_recorder(cfg, experiment: str, optimizer: str, hparams: dict, results_dir: str | Path, accelerator,
                  **extra_hparams) -> RunRecorder | None:
    """The run's :class:`harness.RunRecorder` on the main process (None on the others): the optimizer's
    hyperparameters, the text-encoder/UNet settings and ``extra_hparams``; the tags of ``cfg.tags`` (``preset``)
    with concept, text_lr (and variant), and world_size with several processes (:func:`harness.record_tags`);
    ``launch`` (:func:`harness.launch_info`); ``cfg.wandb``."""
    if not accelerator.is_main_process:
        return None
    launch = launch_info(accelerator.num_processes, cfg.train.batch_size)
    return RunRecorder(
        results_dir, experiment, optimizer=optimizer, seed=cfg.seed,
        hparams={**hparams, "text_lr": cfg.text_lr, "text_reg": cfg.text_reg, "unet_reg": cfg.unet_reg,
                 "fusion_scale": cfg.fusion_scale, "steps": cfg.train.steps, **extra_hparams},
        config=OmegaConf.to_container(cfg, resolve=True),
        tags=record_tags({**OmegaConf.to_container(cfg.tags, resolve=True), "concept": cfg.concept.name,
                          "text_lr": cfg.text_lr, **({"variant": cfg.variant} if cfg.variant else {})}, launch),
        launch=launch, wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb else None, resume=cfg.resume,
        after_training=AFTER_TRAINING,
    )  # fmt: skip


def fuse_sample_and_finish(cfg, model: LoraDiffusionModel, prompt_ids: torch.Tensor, train_scheduler, dataset,
                           recorder, final: dict) -> dict:
    """The end of a diffusion run (main process): fuse the LoRA weights at ``cfg.fusion_scale``, generate one image
    per ``cfg.sample.seeds`` from ``prompt_ids`` = [prompt, empty prompt], score them (black share, CLIP against the
    class word and the concept images if ``cfg.sample.clip_model``), save the strip beside the record as
    ``samples/<record name>.png`` (atomically, listed in the record's ``files``), and close the record with
    ``final`` updated by these metrics and ``sample_time_s`` (the wall time of sampling and scoring); returns
    ``final``."""
    recorder.save(final_metrics=final)  # the training results are on disk before sampling
    fuse_lora(model.unet, cfg.fusion_scale)
    fuse_lora(model.text_encoder, cfg.fusion_scale)
    start = time.perf_counter()
    with recorder.output_file("samples", ".png") as strip_path:
        final.update(sample_and_score(
            model, make_sampler(cfg.sample.sampler, train_scheduler), prompt_ids[0], prompt_ids[1], cfg.sample.seeds,
            cfg.data.resolution, cfg.sample.steps, cfg.sample.guidance_scale, cfg.sample.black_threshold,
            strip_path=strip_path, clip_model=cfg.sample.clip_model,
            references=[to_pil(x[None])[0] for x in dataset.images],
            clip_text=cfg.sample.prompt.replace(cfg.data.placeholder, cfg.concept.class_word)))  # fmt: skip
    final["sample_time_s"] = time.perf_counter() - start
    print(f"{recorder.finish(final)}: black images {final['black_count']}/{final['num_images']}")
    return final
