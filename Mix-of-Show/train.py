"""Mix-of-Show single-concept EDLoRA (paper Figure 3): layer-wise token embeddings for the new concept plus LoRA on
the CLIP text encoder and the UNet, trained on a concept's captioned images; adamw vs scaled_adamw across the
paper's (text, UNet) learning-rate pairs.

    python Mix-of-Show/train.py optim=scaled_adamw paper_lr=t5e-4_u5e-4
    python Mix-of-Show/train.py concept=vase optim=adamw text_lr=1e-5 unet_lr=1e-4
    python Mix-of-Show/train.py -m sweep=paper preset=tiny          # the figure's grid, CPU-sized
    accelerate launch Mix-of-Show/train.py paper_lr=t1e-5_u1e-4     # several GPUs

Steps: load ChilloutMix (or build the tiny model) -> one new token per concept token and cross-attention layer
(edlora.py) -> LoRA on text encoder + UNet -> train with captions "<TOK>, ..." -> fuse the LoRA at
``fusion_scale`` -> "a pencil sketch of <V1> <V2>" for each seed -> record the share of black images in
``results/mix_of_show/<run>.json``, the images in ``results/mix_of_show/samples/<run>.png``; with
``checkpoint.every=N`` a checkpoint every N steps in ``results/mix_of_show/checkpoints/<run>/`` (``resume=true``
continues from the latest).
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for core and harness

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import edlora
from core import build_optimizer
from harness import diffusion as D
from harness import Checkpointer, ResumableDataset, checkpoint_folder, skip_finished, train_loop

EXPERIMENT = "mix_of_show"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration, generate, record; returns the share of black images."""
    accelerator, data_root, results_dir = D.start_run(cfg, EXPERIMENT)  # checks, seed, threads, accelerator, paths

    # -- model: ChilloutMix (or the tiny random one), LoRA, one new token per concept token and cross-attention layer
    sd = D.load_lora_components(cfg, data_root)
    concept_tokens = list(cfg.data.concept_tokens)
    num_layers = edlora.enable_layerwise_conditioning(sd.unet)
    per_layer = edlora.layer_tokens(concept_tokens, num_layers)
    new_ids = D.add_concept_tokens(
        sd.tokenizer, sd.text_encoder, [t for names in per_layer for t in names],
        [init for init in cfg.data.init_tokens for _ in range(num_layers)], cfg.data.init_std,
        trainable=cfg.edlora.train_embeddings)
    weight = sd.text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # every layer's token of one concept token starts from the same vector (upstream)
        for i in range(len(concept_tokens)):
            weight[new_ids[i * num_layers:(i + 1) * num_layers]] = weight[new_ids[i * num_layers]].clone()
    start_rows = weight[new_ids].detach().clone()
    model = D.LoraDiffusionModel(sd.unet, sd.text_encoder, sd.vae, sd.noise_scheduler, cfg.train.noise_offset)

    # -- optimizer: UNet at unet_lr/unet_reg, text-encoder LoRA at text_lr/text_reg, embeddings at embedding_lr
    name, hparams, overrides = D.optimizer_settings(
        OmegaConf.to_container(cfg.optim, resolve=True), cfg.unet_lr, cfg.text_lr, cfg.unet_reg, cfg.text_reg,
        embedding_lr=cfg.edlora.embedding_lr if cfg.edlora.train_embeddings else None, text_encoder=sd.text_encoder)
    recorder = D.make_recorder(
        cfg, EXPERIMENT, name, hparams, results_dir, accelerator, layers=num_layers,
        embedding_lr=cfg.edlora.embedding_lr if cfg.edlora.train_embeddings else 0.0)
    if skip_finished(cfg.skip_finished, recorder):  # skip_finished=true: a finished configuration stops here
        return math.nan
    checkpointer = Checkpointer.from_config(cfg, checkpoint_folder(recorder), accelerator,
                                           after_training=D.AFTER_TRAINING)  # resume rules checked
    optimizer = build_optimizer(model, name, group_overrides=overrides, **hparams)
    counts = D.trainable_counts(model, optimizer)  # recorded: LoRA + token embedding, LoRA pairs
    if cfg.edlora.train_embeddings:  # which rows learn (all frozen at the norm threshold) is part of a checkpoint
        checkpointer.register(embedding_rows=D.keep_original_embedding_rows(
            optimizer, sd.text_encoder.get_input_embeddings(), new_ids, freeze_at_norm=cfg.edlora.emb_norm_threshold))
    decay = cfg.train.lr_decay_steps or cfg.train.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / decay))

    # -- data: the concept's images with their captions, <TOK> -> "<V1> <V2>", bound per layer
    folder = D.concept_folder(cfg, data_root)
    dataset = D.ConceptDataset(folder, cfg.data.resolution,
                               placeholder=cfg.data.placeholder, replacement=" ".join(concept_tokens),
                               random_crop=cfg.data.random_crop, hflip=cfg.data.hflip, jitter=cfg.data.color_jitter)

    def tokenize(prompts: list[str]) -> torch.Tensor:
        return edlora.tokenize_layerwise(sd.tokenizer, prompts, concept_tokens, num_layers)

    loader = torch.utils.data.DataLoader(ResumableDataset(dataset), batch_size=cfg.train.batch_size, shuffle=True,
                                         drop_last=True, collate_fn=D.make_collate(tokenize))
    if len(loader) == 0:
        raise ValueError(f"batch_size {cfg.train.batch_size} is larger than the {len(dataset)} images in {folder}")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # -- train (from the latest checkpoint with resume=true)
    with recorder or contextlib.nullcontext():  # on disk (running) from here, closed however the run ends
        losses = train_loop(model, optimizer, loader, lambda m, batch: m(**batch), scheduler=scheduler,
                            max_steps=cfg.train.steps, epochs=math.ceil(cfg.train.steps / len(loader)),
                            grad_clip=cfg.train.grad_clip, accelerator=accelerator, recorder=recorder,
                            desc=f"{name} text_lr={cfg.text_lr:g} unet_lr={cfg.unet_lr:g}",
                            stop_on_divergence=cfg.train.stop_on_divergence, checkpointer=checkpointer)

        # -- inference: fuse LoRA at fusion_scale, one image per seed, black-image share (+ CLIP scores)
        last = losses[-10:]
        final = {"final_loss": sum(last) / len(last) if last else None, "steps_done": len(losses), **counts}
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            rows = model.text_encoder.get_input_embeddings().weight[new_ids].detach()
            final.update(unet_lora_delta=D.lora_delta_norm(model.unet),
                         text_lora_delta=D.lora_delta_norm(model.text_encoder),
                         token_embedding_delta=(rows - start_rows).norm().item(),
                         token_embedding_norm=rows.norm(dim=-1).mean().item())
            prompt = cfg.sample.prompt.replace(cfg.data.placeholder, " ".join(concept_tokens))
            D.fuse_sample_and_finish(cfg, model, tokenize([prompt, ""]), sd.noise_scheduler, dataset, recorder, final)
    return final.get("black_share", float("nan"))


if __name__ == "__main__":
    main()
