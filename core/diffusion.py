"""Shared pieces of the Stable Diffusion LoRA experiments (``Object_Generation/`` and ``Mix-of-Show/``).

Everything here is experiment plumbing, not the method: the optimizers come from :func:`core.build_optimizer`.

* data: :class:`ConceptDataset` (a folder of 3-20 concept images, optional ``<name>.txt`` captions, random
  crop / flip / colour jitter) with a clear error for a missing or empty folder;
* models: :func:`load_components` loads Stable Diffusion (hub name or local path) or builds a tiny random
  UNet / VAE / CLIP text encoder in code (:func:`tiny_unet_config` ...) with an offline CLIP tokenizer whose
  small vocabulary comes from GPT-2's (:func:`build_tiny_tokenizer`);
* new tokens: :func:`add_concept_tokens` adds placeholder tokens, :func:`keep_original_embedding_rows` makes sure
  only their embedding rows ever change;
* LoRA: :func:`add_lora` (PEFT, linear and 1x1-conv targets), :func:`fuse_lora` (merge at a scale);
* training: :class:`LoraDiffusionModel` (``forward(pixel_values, input_ids) -> loss``; ``input_ids`` of shape
  (B, L, T) give one conditioning per cross-attention layer, as EDLoRA needs);
* evaluation: :func:`generate` (seeded, classifier-free guidance), :func:`black_image_mask`,
  :func:`clip_similarity` (only when a CLIP model path is given), :func:`image_grid`;
* run plumbing shared by the two ``train.py``: :func:`start_run`, :func:`concept_folder`, :func:`make_recorder`,
  :func:`fuse_sample_and_finish`;
  and by the two ``make_figure.py``: :func:`select_records`, :func:`figure_main`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGE_SUFFIXES", "ConceptDataset", "color_jitter", "build_tiny_tokenizer", "tiny_unet_config",
    "tiny_vae_config", "tiny_text_encoder_config", "SDComponents", "load_components", "add_concept_tokens",
    "keep_original_embedding_rows", "add_lora", "lora_layers", "lora_delta_norm", "fuse_lora",
    "optimizer_settings", "tokenize", "LoraDiffusionModel", "make_collate", "make_sampler", "generate",
    "black_image_mask", "to_pil", "clip_similarity", "sample_and_score", "image_grid", "save_strip", "load_strip",
    "black_share_figure", "records_table", "start_run", "concept_folder", "make_recorder", "select_records",
    "figure_main", "fuse_sample_and_finish",
]  # fmt: skip

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------------- data
def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness / contrast / saturation jitter of an image ``x`` (3, H, W) in [0, 1].

    Each factor is drawn uniformly from [1 - s, 1 + s] (``s = 0`` leaves that property alone), like
    torchvision's ``ColorJitter`` without the hue term.
    """
    def factor(strength: float) -> float:
        return 1.0 + (2 * torch.rand((), generator=generator).item() - 1) * strength

    def gray(image: torch.Tensor) -> torch.Tensor:
        return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)

    x = (x * factor(brightness)).clamp(0, 1)
    x = ((x - gray(x).mean()) * factor(contrast) + gray(x).mean()).clamp(0, 1)
    return ((x - gray(x)) * factor(saturation) + gray(x)).clamp(0, 1)


def _concept_files(folder: Path) -> list[tuple[Path, Path | None]]:
    """(image, caption or None) pairs of a concept folder: ``<folder>/*.jpg`` with ``<stem>.txt`` beside them,
    or the Mix-of-Show layout ``<folder>/image/*`` with ``<folder>/caption/<stem>.txt``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder {str(folder)!r} does not exist (set concept.dir= or data_root=)")
    image_dir, caption_dir = (folder / "image", folder / "caption") if (folder / "image").is_dir() else (folder, folder)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"concept folder {str(image_dir)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return [(p, (caption_dir / f"{p.stem}.txt") if (caption_dir / f"{p.stem}.txt").is_file() else None)
            for p in images]


class ConceptDataset(torch.utils.data.Dataset):
    """The few images of one concept, each with its prompt, as ``{"pixel_values": (3, R, R) in [-1, 1], "prompt"}``.

    Args:
        folder: images (``.jpg``/``.png``/...) with optional captions ``<stem>.txt`` beside them (or the
            Mix-of-Show layout ``image/`` + ``caption/``).
        resolution: side of the square training crop.
        prompt: one prompt for every image (DreamBooth style, e.g. ``"a photo of <s1><s2>"``); when ``None`` the
            captions are used, with ``placeholder`` (``"<TOK>"`` in the shared captions) replaced by ``replacement``.
        random_crop, hflip: augmentations (a centre crop without ``random_crop``).
        jitter: (brightness, contrast, saturation) strengths for :func:`color_jitter`, or ``None``.
        repeats: the dataset length is ``repeats x number of images`` (one epoch = that many samples).
    """

    def __init__(self, folder: str | Path, resolution: int, prompt: str | None = None, placeholder: str = "<TOK>",
                 replacement: str = "", random_crop: bool = True, hflip: bool = True,
                 jitter: Sequence[float] | None = None, repeats: int = 1):
        from PIL import Image

        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.folder, self.resolution, self.repeats = Path(folder), int(resolution), int(repeats)
        self.random_crop, self.hflip, self.jitter = random_crop, hflip, (tuple(jitter) if jitter else None)
        self.images, self.prompts = [], []
        for image_path, caption_path in _concept_files(self.folder):
            if prompt is None and caption_path is None:
                raise ValueError(f"image {str(image_path)!r} has no caption file {image_path.stem}.txt; "
                                 "give a caption per image or a fixed prompt")
            text = prompt if prompt is not None else caption_path.read_text(encoding="utf-8").strip()
            self.prompts.append(text.replace(placeholder, replacement) if prompt is None else text)
            image = Image.open(image_path).convert("RGB")
            scale = self.resolution / min(image.size)
            size = tuple(max(self.resolution, round(side * scale)) for side in image.size)
            pixels = torch.from_numpy(np.asarray(image.resize(size, Image.BICUBIC)).copy())
            self.images.append(pixels.permute(2, 0, 1).float() / 255.0)

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        image, prompt = self.images[index % len(self.images)], self.prompts[index % len(self.images)]
        _, h, w = image.shape
        r = self.resolution
        top, left = ((random.randint(0, h - r), random.randint(0, w - r)) if self.random_crop
                     else ((h - r) // 2, (w - r) // 2))
        x = image[:, top:top + r, left:left + r]
        if self.hflip and random.random() < 0.5:
            x = x.flip(-1)
        if self.jitter:
            x = color_jitter(x, *self.jitter)
        return {"pixel_values": x * 2 - 1, "prompt": prompt}


# --------------------------------------------------------------------------------------------------- models
def build_tiny_tokenizer(gpt2_dir: str | Path, num_words: int = 1000, model_max_length: int = 77):
    """A real ``CLIPTokenizer`` (CLIP's byte-level BPE with ``</w>`` word ends, ``<|startoftext|>`` ...
    ``<|endoftext|>``, padded with ``<|endoftext|>``) with a small vocabulary that needs no download.

    The vocabulary is built deterministically from the ``num_words`` most frequent lower-case words of GPT-2's
    vocabulary (``gpt2_dir/vocab.json``, whose ids follow merge rank): the 256 byte symbols, the same with ``</w>``,
    and one merge per new prefix of those words; any text tokenizes (into word pieces and bytes). Only for the
    tiny random-init models, where the segmentation does not matter: real runs use the checkpoint's own tokenizer.
    It saves and loads like any CLIP tokenizer.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab_file = Path(gpt2_dir) / "vocab.json"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary {str(vocab_file)!r} is missing (needed for the tiny tokenizer)")
    if num_words < 1:
        raise ValueError(f"num_words must be >= 1, got {num_words}")
    gpt2 = json.loads(vocab_file.read_text(encoding="utf-8"))
    words = [t[1:] for t, _ in sorted(gpt2.items(), key=lambda kv: kv[1])
             if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()][:num_words]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            if current + symbol not in vocab:
                merges.append((current, symbol))
                vocab[current + symbol] = len(vocab)
            current += symbol
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_unet_config(sample_size: int, channels: Sequence[int] = (32, 64), cross_attention_dim: int = 32,
                     layers_per_block: int = 1, attention_head_dim: int = 8, norm_num_groups: int = 8) -> dict:
    """Config of a small ``UNet2DConditionModel`` with the SD-1.x layout: cross-attention in the first down block,
    the mid block and the last up block, conv ``proj_in``/``proj_out`` (1x1) around each transformer."""
    n = len(channels)
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
                attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, use_linear_projection=False,
                down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1),
                up_block_types=("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",))


def tiny_vae_config(resolution: int, channels: Sequence[int] = (16, 32), norm_num_groups: int = 8) -> dict:
    """Config of a small ``AutoencoderKL`` (4 latent channels, downsampling 2^(len(channels)-1))."""
    n = len(channels)
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(channels),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=1, norm_num_groups=norm_num_groups, sample_size=resolution)


def tiny_text_encoder_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                             bos_token_id: int = 0, eos_token_id: int = 1, pad_token_id: int = 1) -> dict:
    """Config (``CLIPTextConfig`` kwargs) of a small CLIP text encoder for 77-token prompts."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model the experiments use."""

    tokenizer: object
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object


def load_components(pretrained: str | None, tiny: dict | None = None, gpt2_dir: str | Path | None = None,
                    seed: int = 0) -> SDComponents:
    """Stable Diffusion parts from ``pretrained`` (hub name or local diffusers folder with ``tokenizer/``,
    ``text_encoder/``, ``vae/``, ``unet/``, ``scheduler/``), or, when ``pretrained`` is ``None``, a tiny random model
    built in code from ``tiny`` = ``{"resolution", "unet_channels", "vae_channels", "text_hidden", "text_layers",
    "num_words"}`` with the offline tokenizer of :func:`build_tiny_tokenizer` (``gpt2_dir``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if pretrained:
        local = Path(pretrained).expanduser()
        if local.exists() and not (local / "unet").is_dir():
            raise FileNotFoundError(f"{str(local)!r} is not a diffusers Stable Diffusion folder (no unet/ inside)")
        name = str(local) if local.exists() else pretrained
        return SDComponents(CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
                            CLIPTextModel.from_pretrained(name, subfolder="text_encoder"),
                            AutoencoderKL.from_pretrained(name, subfolder="vae"),
                            UNet2DConditionModel.from_pretrained(name, subfolder="unet"),
                            DDPMScheduler.from_pretrained(name, subfolder="scheduler"))
    if not tiny or gpt2_dir is None:
        raise ValueError("without a pretrained model, give the tiny model sizes (tiny=...) and gpt2_dir")
    unknown = set(tiny) - {"resolution", "unet_channels", "vae_channels", "text_hidden", "text_layers", "num_words"}
    if unknown:
        raise ValueError(f"unknown tiny-model keys {sorted(unknown)}")
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(gpt2_dir, num_words=tiny.get("num_words", 1000))
    hidden = tiny.get("text_hidden", 32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(
        len(tokenizer), hidden, tiny.get("text_layers", 2), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)))
    vae_channels = tuple(tiny.get("vae_channels", (16, 32)))
    vae = AutoencoderKL(**tiny_vae_config(tiny["resolution"], vae_channels))
    latent = tiny["resolution"] // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(**tiny_unet_config(latent, tuple(tiny.get("unet_channels", (32, 64))), hidden))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")  # Stable Diffusion's training noise schedule
    return SDComponents(tokenizer, text_encoder, vae, unet, scheduler)


# --------------------------------------------------------------------------------------------------- new tokens
def load_lora_components(cfg, data_root: str | Path) -> SDComponents:
    """The components an experiment config names (``cfg.model``: ``pretrained`` or ``tiny``, ``gpt2_dir``; seeded by
    ``cfg.seed``) with LoRA on the UNet and the text encoder (``cfg.lora``: targets, ``rank``, ``alpha``)."""
    from omegaconf import OmegaConf

    gpt2_dir = cfg.model.gpt2_dir or Path(data_root) / "gpt2-tokenizer"
    tiny = OmegaConf.to_container(cfg.model.tiny, resolve=True) if cfg.model.tiny else None
    sd = load_components(cfg.model.pretrained, tiny, gpt2_dir, seed=cfg.seed)
    add_lora(sd.unet, cfg.lora.unet_targets, cfg.lora.rank, cfg.lora.alpha)
    add_lora(sd.text_encoder, cfg.lora.text_targets, cfg.lora.rank, cfg.lora.alpha)
    return sd


def add_concept_tokens(tokenizer, text_encoder: nn.Module, tokens: Sequence[str],
                       init_tokens: Sequence[str | None] | None = None, init_std: float = 0.017,
                       trainable: bool = True) -> list[int]:
    """Add placeholder ``tokens`` to the tokenizer and give each a new row in the text encoder's input embedding.

    A row is copied from ``init_tokens[i]`` when that is a word the tokenizer encodes as a single token, otherwise
    drawn from N(0, ``init_std``^2) (Mix-of-Show's ``<rand-0.017>``). With ``trainable`` the embedding weight is
    made trainable (call this after :func:`add_lora`, which freezes the model, and build the optimizer after it;
    then :func:`keep_original_embedding_rows`). Returns the new token ids, in order.
    """
    tokens = list(tokens)
    init_tokens = list(init_tokens) if init_tokens is not None else [None] * len(tokens)
    if len(init_tokens) != len(tokens):
        raise ValueError(f"{len(tokens)} new tokens but {len(init_tokens)} initializer tokens")
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash or len(set(tokens)) != len(tokens):
        raise ValueError(f"new tokens must be distinct and not in the tokenizer already: {clash or tokens}")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id, init in zip(ids, init_tokens):
            init_ids = tokenizer.encode(init, add_special_tokens=False) if init else []
            if init and len(init_ids) != 1:
                raise ValueError(f"initializer token {init!r} is {len(init_ids)} tokens, not one")
            weight[token_id] = weight[init_ids[0]].clone() if init_ids else torch.randn_like(weight[0]) * init_std
    weight.requires_grad_(trainable)
    return ids


def keep_original_embedding_rows(optimizer: torch.optim.Optimizer, embedding: nn.Embedding,
                                 trainable_ids: Sequence[int], freeze_at_norm: float | None = None):
    """Restore every row of the (trainable) ``embedding`` weight outside ``trainable_ids`` after each step of
    ``optimizer`` (weight decay or momentum could otherwise move them), so only the new tokens learn.

    With ``freeze_at_norm`` the new rows are frozen too once their mean L2 norm reaches it (Mix-of-Show's
    ``emb_norm_threshold``). Returns the hook handle (``.remove()`` to undo).
    """
    weight = embedding.weight
    if not any(p is weight for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the embedding weight is not optimized by this optimizer: make it trainable "
                         "(add_concept_tokens(..., trainable=True)) before building the optimizer")
    ids = torch.as_tensor(list(trainable_ids), dtype=torch.long)
    state = {"keep": torch.ones(weight.shape[0], dtype=torch.bool)}
    state["keep"][ids] = False
    state["rows"] = weight.detach()[state["keep"]].clone()

    def restore(*_):
        with torch.no_grad():
            keep = state["keep"].to(weight.device)
            weight[keep] = state["rows"].to(weight.device, weight.dtype)
            if freeze_at_norm is not None and not keep.all() and weight[ids].norm(dim=-1).mean() >= freeze_at_norm:
                state["keep"][:] = True
                state["rows"] = weight.detach().clone()

    return optimizer.register_step_post_hook(restore)


# --------------------------------------------------------------------------------------------------- LoRA
def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> nn.Module:
    """Inject PEFT LoRA (``lora_A``/``lora_B``, zero-initialised ``B``) into the modules whose names end with one of
    ``targets`` (linear layers and convolutions, e.g. SD's 1x1 ``proj_in``). Only the LoRA factors stay
    trainable; everything else in ``model`` is frozen. The model keeps its own parameter names."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of {type(model).__name__}")
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), model)
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def lora_delta_norm(model: nn.Module) -> float:
    """sqrt(sum over LoRA layers of ||(alpha / r) B A||_F^2): how far training moved ``model`` (NaN if diverged)."""
    total = 0.0
    for layer in lora_layers(model):
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                total += layer.get_delta_weight(adapter).float().pow(2).sum().item()
    return math.sqrt(total)


def fuse_lora(model: nn.Module, scale: float) -> int:
    """Merge every LoRA update into its base weight at ``scale``: W <- W + scale * (alpha / r) * B A (the
    "LoRA fusion" of the paper's figures). NaN/inf factors are merged as they are (they make black images, which is
    what the experiments count). Returns the number of merged layers."""
    layers = lora_layers(model)
    for layer in layers:
        if layer.merged:
            raise RuntimeError(f"LoRA layer {type(layer).__name__} is already fused")
        layer.scale_layer(scale)
        layer.merge(safe_merge=False)
    return len(layers)


def optimizer_settings(optim: dict, unet_lr: float, text_lr: float, unet_reg: float = 0.0, text_reg: float = 0.0,
                       embedding_lr: float | None = None, text_encoder: nn.Module | None = None
                       ) -> tuple[str, dict, dict]:
    """``(name, hparams, group_overrides)`` for :func:`core.build_optimizer` on a :class:`LoraDiffusionModel`:
    the UNet at ``unet_lr`` (``unet_reg``), the text encoder at ``text_lr`` (``text_reg``), and, with
    ``embedding_lr``, the input token embedding of ``text_encoder`` at its own LR. ``optim`` is the Hydra ``optim``
    group (``name`` plus hyperparameters); the regularisers go only to the scaled optimizers, which take ``reg``."""
    hparams = dict(optim)
    name = hparams.pop("name")
    scaled = name.startswith("scaled_")
    regs = ({"reg": float(unet_reg)}, {"reg": float(text_reg)}) if scaled else ({}, {})
    overrides = {"text_encoder": {"lr": float(text_lr), **regs[1]}}
    if embedding_lr is not None:
        if text_encoder is None:
            raise ValueError("embedding_lr needs the text_encoder (to find its token embedding)")
        embedding = text_encoder.get_input_embeddings()
        module = next(n for n, m in text_encoder.named_modules() if m is embedding)
        overrides[f"text_encoder.{module}"] = {"lr": float(embedding_lr)}
    return name, {**hparams, "lr": float(unet_lr), **regs[0]}, overrides


# --------------------------------------------------------------------------------------------------- training
def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(N, model_max_length) token ids, padded and truncated like Stable Diffusion's pipelines."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class LoraDiffusionModel(nn.Module):
    """UNet + text encoder (with LoRA) + frozen VAE; ``forward`` is the denoising loss of Stable Diffusion training.

    Parameter names start with ``unet.``, ``text_encoder.``, ``vae.``, so
    ``core.build_optimizer(model, ..., group_overrides={"text_encoder": {...}})`` sets the text encoder apart.
    ``input_ids`` of shape (B, T) condition every cross-attention layer on the same text; shape (B, L, T) gives
    layer ``l`` its own prompt (EDLoRA's layer-wise embeddings, read by the attention processors of the UNet).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, noise_scheduler,
                 noise_offset: float = 0.0):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.noise_scheduler, self.noise_offset = noise_scheduler, noise_offset
        self.vae.requires_grad_(False)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, D) or (B, L, T) -> (B, L, T, D) text-encoder hidden states."""
        flat = input_ids.reshape(-1, input_ids.shape[-1])
        hidden = self.text_encoder(flat)[0]
        return hidden.reshape(*input_ids.shape, hidden.shape[-1])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        prediction = self.unet(noisy, t, self.encode_text(input_ids)).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())


def make_collate(tokenize_prompts: Callable[[list[str]], torch.Tensor]) -> Callable[[list[dict]], dict]:
    """DataLoader ``collate_fn`` turning :class:`ConceptDataset` items into ``{"pixel_values", "input_ids"}``."""
    def collate(items: list[dict]) -> dict:
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
                "input_ids": tokenize_prompts([i["prompt"] for i in items])}
    return collate


# --------------------------------------------------------------------------------------------------- sampling
def make_sampler(name: str, train_scheduler):
    """An inference scheduler (``"ddim"``, ``"euler_ancestral"``, ``"ddpm"``) with the training noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

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
    from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------------------------------- metrics
def black_image_mask(images: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Which images are "black": non-finite anywhere (NaN/inf, rendered black) or mean intensity below
    ``threshold`` (images in [0, 1], shape (N, C, H, W)). Returns a bool tensor (N,)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    return ~finite | (torch.nan_to_num(images, nan=0.0).flatten(1).mean(dim=1) < threshold)


def to_pil(images: torch.Tensor) -> list:
    """PIL images of (N, 3, H, W) in [0, 1]; non-finite pixels become black."""
    from PIL import Image

    arr = (torch.nan_to_num(images, nan=0.0, posinf=0.0, neginf=0.0).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


@torch.no_grad()
def clip_similarity(clip_path: str | Path, images: Sequence, texts: Sequence[str], references: Sequence = ()) -> dict:
    """Mean CLIP cosine similarity of generated ``images`` (PIL) to their ``texts`` (``clip_text``) and to the
    concept's ``references`` images (``clip_image``), with the CLIP model at ``clip_path`` (local folder or hub
    name usable offline). Black images are included (they lower both scores)."""
    from transformers import CLIPModel, CLIPProcessor

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


# --------------------------------------------------------------------------------------------------- figures
def image_grid(cells: dict[tuple[str, str], Sequence], rows: Sequence[str], cols: Sequence[str],
               footers: dict[tuple[str, str], str] | None = None, thumb: int = 96, per_row: int | None = None,
               title: str | None = None):
    """One PIL figure: a panel per (row, col) label pair holding its images (tiled ``per_row`` across), the row
    label on the left, the column label on top and ``footers[(row, col)]`` (e.g. the black-image share) printed
    under each panel. Missing cells stay empty."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda text: int(measure.textlength(str(text), font=font)) + 4  # noqa: E731
    counts = [len(v) for v in cells.values()] or [1]
    per_row = per_row or max(1, math.ceil(math.sqrt(max(counts))))
    lines = max(1, math.ceil(max(counts) / per_row))
    pad, head_h, foot_h = 8, 18, 18
    label_w = max(text_w(r) for r in rows) + pad
    title_h = 20 if title else 0
    cell_w = max([per_row * thumb] + [text_w(c) for c in cols] + [text_w(f) for f in (footers or {}).values()])
    cell_h = lines * thumb
    width = max(label_w + len(cols) * (cell_w + pad) + pad, text_w(title) + 2 * pad if title else 0)
    height = title_h + head_h + len(rows) * (cell_h + foot_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    for j, col in enumerate(cols):
        draw.text((label_w + j * (cell_w + pad) + pad, title_h + 4), str(col), fill="black", font=font)
    for i, row in enumerate(rows):
        y = title_h + head_h + i * (cell_h + foot_h + pad)
        draw.text((pad, y + cell_h // 2), str(row), fill="black", font=font)
        for j, col in enumerate(cols):
            x = label_w + j * (cell_w + pad) + pad
            for k, image in enumerate(cells.get((row, col), ())):
                tile = image.resize((thumb, thumb), Image.NEAREST)
                canvas.paste(tile, (x + (k % per_row) * thumb, y + (k // per_row) * thumb))
            if footers and (row, col) in footers:
                draw.text((x, y + cell_h + 3), footers[(row, col)], fill="black", font=font)
    return canvas


def save_strip(images: Sequence, path: str | Path) -> Path:
    """Save PIL images of one size side by side in one PNG (the samples of one run)."""
    from PIL import Image

    if not images:
        raise ValueError("no images to save")
    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for i, image in enumerate(images):
        strip.paste(image, (i * w, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def load_strip(path: str | Path) -> list:
    """The square images of a strip written by :func:`save_strip`."""
    from PIL import Image

    strip = Image.open(path).convert("RGB")
    side = strip.size[1]
    return [strip.crop((i * side, 0, (i + 1) * side, side)) for i in range(strip.size[0] // side)]


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


def black_share_figure(records: Sequence, samples_dir: str | Path, column: Callable, column_label: Callable,
                       out_png: str | Path, title: str, thumb: int = 64) -> Path:
    """The LR x optimizer grid of the diffusion experiments: one panel of samples per record (rows = optimizer,
    columns = ``column(record)`` sorted high to low, labelled ``column_label(value)``), with the black-image share
    (and the divergence step, if any) printed under each panel. Samples are read from
    ``samples_dir/<run_name>.png``."""
    if not records:
        raise ValueError(f"no run records to draw for {title!r}")
    order = {"sgd": 0, "scaled_gd": 1, "adamw": 2, "scaled_adamw": 3}
    rows = sorted({r.optimizer for r in records}, key=lambda o: (order.get(o, 9), o))
    values = sorted({column(r) for r in records}, reverse=True)
    cols = [column_label(v) for v in values]
    cells, footers = {}, {}
    for r in records:
        key = (r.optimizer, column_label(column(r)))
        strip = Path(samples_dir) / f"{r.run_name}.png"
        cells[key] = load_strip(strip) if strip.is_file() else []
        m = r.final_metrics
        text = f"black {m.get('black_count', '?')}/{m.get('num_images', '?')}"
        if m.get("diverged_at_step"):
            text += f", diverged @{m['diverged_at_step']}"
        footers[key] = text
    figure = image_grid(cells, rows, cols, footers, thumb=thumb, per_row=4, title=title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out_png)
    return out_png


def records_table(records: Sequence, columns: Sequence[tuple[str, Callable]]) -> str:
    """A Markdown table with one row per record and ``columns`` = ``[(header, record -> value), ...]``
    (floats printed with 4 significant digits)."""
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(f(r)) for _, f in columns) + " |" for r in records]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- run plumbing
def start_run(cfg) -> tuple:
    """The opening of a diffusion run: seed, torch threads, the accelerator; returns ``(accelerator, data_root,
    results_dir)`` (``cfg.data_root`` or :func:`core.default_data_root`; ``cfg.results_dir`` below the repo)."""
    from accelerate import Accelerator

    from .training import REPO_ROOT, default_data_root, seed_everything

    seed_everything(cfg.seed)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    data_root = Path(cfg.data_root) if cfg.data_root else default_data_root()
    return accelerator, data_root, REPO_ROOT / cfg.results_dir


def concept_folder(cfg, data_root: str | Path) -> Path:
    """``cfg.concept.dir`` if given, else ``<data_root>/concepts/<cfg.concept.name>``; a clear error if absent."""
    from .training import require_path

    folder = Path(cfg.concept.dir) if cfg.concept.dir else Path(data_root) / "concepts" / cfg.concept.name
    return require_path(folder, f"concept folder for '{cfg.concept.name}'")


def make_recorder(cfg, experiment: str, optimizer: str, hparams: dict, results_dir: str | Path, accelerator,
                  **extra_hparams):
    """The run's :class:`core.RunRecorder`: the optimizer's hyperparameters, the text-encoder/UNet settings and
    ``extra_hparams``; tags preset, concept, text_lr (and variant); wandb on the main process only."""
    from omegaconf import OmegaConf

    from .results import RunRecorder

    return RunRecorder(
        results_dir, experiment, optimizer=optimizer, seed=cfg.seed,
        hparams={**hparams, "text_lr": cfg.text_lr, "text_reg": cfg.text_reg, "unet_reg": cfg.unet_reg,
                 "fusion_scale": cfg.fusion_scale, "steps": cfg.train.steps, **extra_hparams},
        config=OmegaConf.to_container(cfg, resolve=True),
        tags={"preset": cfg.preset_name, "concept": cfg.concept.name, "text_lr": cfg.text_lr,
              **({"variant": cfg.variant} if cfg.variant else {})},
        wandb=OmegaConf.to_container(cfg.wandb) if cfg.wandb and accelerator.is_main_process else None,
    )  # fmt: skip


def fuse_sample_and_finish(cfg, model: LoraDiffusionModel, prompt_ids: torch.Tensor, train_scheduler, dataset,
                           recorder, final: dict) -> dict:
    """The end of a diffusion run (main process): fuse the LoRA weights at ``cfg.fusion_scale``, generate one image
    per ``cfg.sample.seeds`` from ``prompt_ids`` = [prompt, empty prompt], score them (black share, CLIP against the
    class word and the concept images if ``cfg.sample.clip_model``), save the strip beside the record as
    ``samples/<run_name>.png``, and write the record with ``final`` updated by these metrics; returns ``final``."""
    fuse_lora(model.unet, cfg.fusion_scale)
    fuse_lora(model.text_encoder, cfg.fusion_scale)
    final.update(sample_and_score(
        model, make_sampler(cfg.sample.sampler, train_scheduler), prompt_ids[0], prompt_ids[1], cfg.sample.seeds,
        cfg.data.resolution, cfg.sample.steps, cfg.sample.guidance_scale, cfg.sample.black_threshold,
        strip_path=Path(recorder.path).parent / "samples" / f"{recorder.record.run_name}.png",
        clip_model=cfg.sample.clip_model, references=[to_pil(x[None])[0] for x in dataset.images],
        clip_text=cfg.sample.prompt.replace(cfg.data.placeholder, cfg.concept.class_word)))  # fmt: skip
    print(f"{recorder.finish(final)}: black images {final['black_count']}/{final['num_images']}")
    return final


def select_records(results_dir: str | Path, experiment: str, concept: str, preset: str | None) -> tuple[str, list]:
    """``(preset, records)`` of ``concept`` in ``results_dir/<experiment>``; ``preset`` defaults to ``full`` if
    recorded, else ``tiny``. No record is a clear error listing the presets found."""
    from .results import load_records

    records = [r for r in load_records(results_dir, experiment) if r.tags.get("concept") == concept]
    presets = {r.tags.get("preset") for r in records}
    preset = preset or ("full" if "full" in presets else "tiny")
    records = [r for r in records if r.tags.get("preset") == preset]
    if not records:
        raise ValueError(f"no {experiment} records for concept {concept!r}, preset {preset!r} in {results_dir} "
                         f"(presets found: {sorted(p for p in presets if p)})")
    return preset, records


def figure_main(description: str, experiment: str, default_concept: str, make_figure: Callable,
                table: Sequence[tuple[str, Callable]], sort_key: Callable, argv: Sequence[str] | None = None) -> None:
    """The command line of a ``make_figure.py``: draw ``make_figure(results_dir, out, concept, preset)`` or, with
    ``--table``, print the records as a Markdown table (rows sorted by ``sort_key``)."""
    import argparse

    from .training import REPO_ROOT

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "results"))
    parser.add_argument("--concept", default=default_concept)
    parser.add_argument("--preset", default=None, help="full | tiny (default: full if recorded, else tiny)")
    parser.add_argument("--out", default=None, help="default: <results-dir>/<experiment>/figure_<concept>_<preset>.png")
    parser.add_argument("--table", action="store_true", help="print the records as a Markdown table instead")
    args = parser.parse_args(argv)
    preset, records = select_records(args.results_dir, experiment, args.concept, args.preset)
    if args.table:
        print(records_table(sorted(records, key=sort_key), table))
    else:
        out = args.out or Path(args.results_dir) / experiment / f"figure_{args.concept}_{preset}.png"
        print(make_figure(args.results_dir, out, args.concept, preset))
