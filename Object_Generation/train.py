"""Object generation: DreamBooth-style LoRA on Stable Diffusion, UNet and CLIP text encoder trained together
(paper Figure 1: the vase; appendix: the chair). Only the text encoder's optimizer settings change across the grid.

    python Object_Generation/train.py concept=vase optim=scaled_adamw paper_lr=lr1e-2
    python Object_Generation/train.py concept=vase optim=adamw text_lr=1e-3 text_reg=1e6 fusion_scale=0.67
    python Object_Generation/train.py -m sweep=paper preset=tiny          # the figure's grid, CPU-sized
    accelerate launch Object_Generation/train.py paper_lr=lr1e-3         # several GPUs

Steps: load SD (or build the tiny model) -> LoRA on UNet attention + text encoder, new tokens <s1><s2> with
trainable embedding rows -> train on the concept images with the prompt "a photo of <s1><s2>" -> fuse the LoRA at
``fusion_scale`` -> generate one image per seed -> record the share of black images (and CLIP scores with a CLIP
model) in ``results/object_generation/<run>.json``, the images in ``results/object_generation/samples/<run>.png``;
with ``checkpoint.every=N`` a checkpoint every N steps in ``results/object_generation/checkpoints/<run>/``
(``resume=true`` continues from the latest).
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

from core import build_optimizer
from harness import diffusion as D
from harness import Checkpointer, ResumableDataset, checkpoint_folder, skip_finished, train_loop

EXPERIMENT = "object_generation"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration, generate, record; returns the share of black images."""
    accelerator, data_root, results_dir = D.start_run(cfg, EXPERIMENT)  # checks, seed, threads, accelerator, paths

    # -- model: Stable Diffusion (or the tiny random one), LoRA on UNet + text encoder, new placeholder tokens
    sd = D.load_lora_components(cfg, data_root)
    new_ids = D.add_concept_tokens(sd.tokenizer, sd.text_encoder, list(cfg.data.new_tokens),
                                   init_std=cfg.data.init_std) if cfg.data.new_tokens else []
    start_rows = sd.text_encoder.get_input_embeddings().weight[new_ids].detach().clone()
    model = D.LoraDiffusionModel(sd.unet, sd.text_encoder, sd.vae, sd.noise_scheduler)

    # -- optimizer: UNet at unet_lr/unet_reg, text encoder (LoRA and new embedding rows) at text_lr/text_reg
    name, hparams, overrides = D.optimizer_settings(
        OmegaConf.to_container(cfg.optim, resolve=True), cfg.unet_lr, cfg.text_lr, cfg.unet_reg, cfg.text_reg)
    recorder = D.make_recorder(cfg, EXPERIMENT, name, hparams, results_dir, accelerator)
    if skip_finished(cfg.skip_finished, recorder):  # skip_finished=true: a finished configuration stops here
        return math.nan
    checkpointer = Checkpointer.from_config(cfg, checkpoint_folder(recorder), accelerator,
                                           after_training=D.AFTER_TRAINING)  # resume rules checked
    optimizer = build_optimizer(model, name, group_overrides=overrides, **hparams)
    counts = D.trainable_counts(model, optimizer)  # recorded: LoRA + token embedding, LoRA pairs
    if new_ids:
        checkpointer.register(embedding_rows=D.keep_original_embedding_rows(
            optimizer, sd.text_encoder.get_input_embeddings(), new_ids))

    # -- data: the concept images, all with the instance prompt, colour jitter
    dataset = D.ConceptDataset(D.concept_folder(cfg, data_root), cfg.data.resolution, prompt=cfg.data.instance_prompt,
                               random_crop=cfg.data.random_crop, hflip=cfg.data.hflip, jitter=cfg.data.color_jitter)
    loader = torch.utils.data.DataLoader(ResumableDataset(dataset), batch_size=cfg.train.batch_size, shuffle=True,
                                         collate_fn=D.make_collate(lambda p: D.tokenize(sd.tokenizer, p)))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # -- train (from the latest checkpoint with resume=true)
    with recorder or contextlib.nullcontext():  # on disk (running) from here, closed however the run ends
        losses = train_loop(model, optimizer, loader, lambda m, batch: m(**batch), max_steps=cfg.train.steps,
                            epochs=math.ceil(cfg.train.steps / len(loader)), grad_clip=cfg.train.grad_clip,
                            accelerator=accelerator, recorder=recorder, desc=f"{name} text_lr={cfg.text_lr:g}",
                            stop_on_divergence=cfg.train.stop_on_divergence, checkpointer=checkpointer)

        # -- inference: fuse LoRA at fusion_scale, one image per seed, black-image share (+ CLIP scores)
        last = losses[-10:]
        final = {"final_loss": sum(last) / len(last) if last else None, "steps_done": len(losses), **counts}
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            final.update(unet_lora_delta=D.lora_delta_norm(model.unet),
                         text_lora_delta=D.lora_delta_norm(model.text_encoder),
                         token_embedding_delta=(model.text_encoder.get_input_embeddings().weight[new_ids].detach()
                                                - start_rows).norm().item())
            prompt_ids = D.tokenize(sd.tokenizer, [cfg.sample.prompt, ""])
            D.fuse_sample_and_finish(cfg, model, prompt_ids, sd.noise_scheduler, dataset, recorder, final)
    return final.get("black_share", float("nan"))


if __name__ == "__main__":
    main()
