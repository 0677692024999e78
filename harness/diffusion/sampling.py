"""Images from a trained model and what is measured on them.

* :func:`make_sampler` (an inference scheduler with the training noise schedule), :func:`generate` (seeded per
  image, classifier-free guidance);
* :func:`black_image_mask` (the paper's failure measure: non-finite or all-dark images), :func:`to_pil`,
  :func:`clip_similarity` (only with a CLIP model);
* :func:`sample_and_score`: all of it for one run, the images saved as a strip
  (:func:`harness.diffusion.figures.save_strip`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from .figures import save_strip
from .models import LoraDiffusionModel

__all__ = ["SAMPLERS", "make_sampler", "generate", "black_image_mask", "to_pil", "clip_similarity", "sample_and_score"]


SAMPLERS = ("ddim", "ddpm", "euler_ancestral")  # the inference schedulers make_sampler builds


def make_sampler(name: str, train_scheduler):
    """An inference scheduler (one of :data:`SAMPLERS`) with the training noise schedule."""
    classes = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(classes)}")
    return classes[name].from_config(train_scheduler.config)


@torch.no_grad()
def generate(unet: nn.Module, vae: nn.Module, sampler, cond: torch.Tensor, uncond: torch.Tensor,
             seeds: Sequence[int], latent_size: int, steps: int = 50, guidance_scale: float = 7.0,
             batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] (NaN kept) for ``len(seeds)`` seeds with classifier-free guidance.

    ``cond`` / ``uncond`` are the text conditionings of one prompt and of the empty prompt, (1, T, D), or
    (1, L, T, D) for layer-wise conditioning. Each image depends only on its own seed (one generator per image).
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    images = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="generate", disable=not progress):
        chunk = list(seeds)[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in chunk]
        latents = torch.stack([torch.randn(4, latent_size, latent_size, generator=g) for g in generators])
        sampler.set_timesteps(steps)
        latents = latents.to(device, dtype) * sampler.init_noise_sigma
        context = torch.cat([uncond.expand(len(chunk), *uncond.shape[1:]), cond.expand(len(chunk), *cond.shape[1:])])
        for t in sampler.timesteps:
            model_in = sampler.scale_model_input(torch.cat([latents, latents]), t)
            eps_uncond, eps_cond = unet(model_in, t, context.to(device, dtype)).sample.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = sampler.step(eps, t, latents, generator=generators).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.float().cpu()
        images.append(torch.clamp(decoded / 2 + 0.5, 0, 1))  # clamp keeps NaN
    return torch.cat(images)


def black_image_mask(images: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Which images are "black": non-finite anywhere (NaN/inf, rendered black) or mean intensity below
    ``threshold`` (images in [0, 1], shape (N, C, H, W)). Returns a bool tensor (N,)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    return ~finite | (torch.nan_to_num(images, nan=0.0).flatten(1).mean(dim=1) < threshold)


def to_pil(images: torch.Tensor) -> list:
    """PIL images of (N, 3, H, W) in [0, 1]; non-finite pixels become black."""
    arr = (torch.nan_to_num(images, nan=0.0, posinf=0.0, neginf=0.0).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


@torch.no_grad()
def clip_similarity(clip_path: str | Path, images: Sequence, texts: Sequence[str], references: Sequence = ()) -> dict:
    """Mean CLIP cosine similarity of generated ``images`` (PIL) to their ``texts`` (``clip_text``) and to the
    concept's ``references`` images (``clip_image``), with the CLIP model at ``clip_path`` (local folder or hub
    name usable offline). Black images are included (they lower both scores)."""
    model, processor = CLIPModel.from_pretrained(str(clip_path)).eval(), CLIPProcessor.from_pretrained(str(clip_path))

    def embed_images(pil):
        pixels = processor(images=list(pil), return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixels)
        out = out if torch.is_tensor(out) else out.pooler_output
        return F.normalize(out, dim=-1)

    tokens = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    text = F.normalize(text if torch.is_tensor(text) else text.pooler_output, dim=-1)
    generated = embed_images(images)
    scores = {"clip_text": (generated * text).sum(-1).mean().item()}
    if len(references):
        scores["clip_image"] = (generated @ embed_images(references).T).mean().item()
    return scores


@torch.no_grad()
def sample_and_score(model: LoraDiffusionModel, sampler, cond_ids: torch.Tensor, uncond_ids: torch.Tensor,
                     seeds: Sequence[int], resolution: int, steps: int, guidance_scale: float,
                     black_threshold: float = 0.05, strip_path: str | Path | None = None,
                     clip_model: str | None = None, clip_text: str | None = None, references: Sequence = ()) -> dict:
    """Generate one image per seed from token ids ``cond_ids`` ((T,) or (L, T) layer-wise) with the (fused) model,
    save them as a strip and return the metrics: ``black_share``, ``black_count``, ``num_images``, the images'
    ``mean_intensity`` and, with ``clip_model``, ``clip_text`` (against ``clip_text``) and ``clip_image``."""
    model.eval()
    device = next(model.unet.parameters()).device
    cond = model.encode_text(cond_ids.unsqueeze(0).to(device))
    uncond = model.encode_text(uncond_ids.unsqueeze(0).to(device))
    scale = 2 ** (len(model.vae.config.block_out_channels) - 1)
    images = generate(model.unet, model.vae, sampler, cond, uncond, seeds, resolution // scale, steps, guidance_scale,
                      progress=True)
    black = black_image_mask(images, black_threshold)
    pil = to_pil(images)
    if strip_path is not None:
        save_strip(pil, strip_path)
    metrics = {"black_share": black.float().mean().item(), "black_count": int(black.sum()), "num_images": len(pil),
               "mean_intensity": torch.nan_to_num(images, nan=0.0).mean().item()}
    if clip_model:
        metrics.update(clip_similarity(clip_model, pil, [clip_text or ""] * len(pil), references))
    return metrics
