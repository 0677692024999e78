"""Stable Diffusion's parts with LoRA and new concept tokens, and the training loss.

* :func:`load_components` loads Stable Diffusion (hub name or local diffusers folder), builds its architecture
  from its configuration files with random weights (``random_init``; Stable Diffusion 1.5's files are in
  ``harness/diffusion/configs/stable-diffusion-v1-5``) or builds a tiny random UNet / VAE / CLIP text encoder in
  code (:func:`tiny_unet_config` ...), the last two with an offline CLIP tokenizer whose vocabulary comes from
  GPT-2's (:func:`build_tiny_tokenizer`);
* new tokens: :func:`add_concept_tokens` adds placeholder tokens, :func:`keep_original_embedding_rows` makes sure
  only their embedding rows ever change (an :class:`EmbeddingRowGuard`, checkpointed with the run);
* LoRA: :func:`add_lora` (PEFT, linear and 1x1-conv targets), :func:`lora_layers`, :func:`lora_delta_norm`,
  :func:`fuse_lora` (merge at a scale);
* :class:`LoraDiffusionModel` (``forward(pixel_values, input_ids) -> loss``; ``input_ids`` of shape (B, L, T) give
  one conditioning per cross-attention layer, as EDLoRA needs) and :func:`optimizer_settings`, the arguments of
  :func:`core.build_optimizer` that set the UNet and the text encoder apart, and :func:`trainable_counts`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from tokenizers import pre_tokenizers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "build_tiny_tokenizer", "tiny_unet_config", "tiny_vae_config", "tiny_text_encoder_config", "SDComponents",
    "CONFIG_FILES", "load_components", "random_init_tokenizer_source", "add_concept_tokens",
    "keep_original_embedding_rows", "EmbeddingRowGuard", "add_lora", "lora_layers", "lora_delta_norm", "fuse_lora",
    "optimizer_settings", "trainable_counts", "LoraDiffusionModel",
]  # fmt: skip


def build_tiny_tokenizer(gpt2_dir: str | Path, num_words: int = 1000, model_max_length: int = 77,
                         vocab_size: int | None = None):
    """A real ``CLIPTokenizer`` (CLIP's byte-level BPE with ``</w>`` word ends, ``<|startoftext|>`` ...
    ``<|endoftext|>``, padded with ``<|endoftext|>``) with a small vocabulary that needs no download.

    The vocabulary is built deterministically from the ``num_words`` most frequent lower-case words of GPT-2's
    vocabulary (``gpt2_dir/vocab.json``, whose ids follow merge rank): the 256 byte symbols, the same with ``</w>``,
    and one merge per new prefix of those words; any text tokenizes (into word pieces and bytes). Only for
    random-init models, where the segmentation does not matter: real runs use the checkpoint's own tokenizer.
    It saves and loads like any CLIP tokenizer.

    With ``vocab_size`` (e.g. 49408, CLIP's), ``num_words`` is ignored: the merges of GPT-2's words, in order, are
    taken until the vocabulary has exactly ``vocab_size`` entries, the last two ``<|startoftext|>`` and
    ``<|endoftext|>`` (ids 49406 and 49407 at CLIP's size, as in CLIP's own tokenizer).
    """
    vocab_file = Path(gpt2_dir) / "vocab.json"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary {str(vocab_file)!r} is missing (needed for the tiny tokenizer)")
    if num_words < 1:
        raise ValueError(f"num_words must be >= 1, got {num_words}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size is not None and vocab_size < 2 * len(alphabet) + 2:
        raise ValueError(f"vocab_size must be at least {2 * len(alphabet) + 2} (bytes, bytes</w>, the two special "
                         f"tokens), got {vocab_size}")
    gpt2 = json.loads(vocab_file.read_text(encoding="utf-8"))
    words = [t[1:] for t, _ in sorted(gpt2.items(), key=lambda kv: kv[1])
             if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()]
    words = words if vocab_size is not None else words[:num_words]
    size = vocab_size - 2 if vocab_size is not None else None  # before the two special tokens
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            if len(vocab) == size:
                break
            if current + symbol not in vocab:
                merges.append((current, symbol))
                vocab[current + symbol] = len(vocab)
            current += symbol
    if size is not None and len(vocab) < size:
        raise ValueError(f"GPT-2's words in {str(vocab_file)!r} give {len(vocab) + 2} vocabulary entries, "
                         f"fewer than vocab_size={vocab_size}")
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


# The files a random-init model is built from (``random_init=True``), per component folder.
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}


def load_components(pretrained: str | None, tiny: dict | None = None, gpt2_dir: str | Path | None = None,
                    seed: int = 0, random_init: bool = False) -> SDComponents:
    """Stable Diffusion parts from ``pretrained`` (hub name or local diffusers folder with ``tokenizer/``,
    ``text_encoder/``, ``vae/``, ``unet/``, ``scheduler/``), or, when ``pretrained`` is ``None``, a tiny random model
    built in code from ``tiny`` = ``{"resolution", "unet_channels", "vae_channels", "text_hidden", "text_layers",
    "num_words"}`` with the offline tokenizer of :func:`build_tiny_tokenizer` (``gpt2_dir``).

    With ``random_init`` only the configuration files of ``pretrained`` are read (:data:`CONFIG_FILES`, e.g. the
    folder ``harness/diffusion/configs/stable-diffusion-v1-5``) and the architectures are built from them with
    random weights (seeded by ``seed``); the tokenizer is ``pretrained``'s ``tokenizer/`` if it has one, otherwise
    :func:`build_tiny_tokenizer` (``gpt2_dir``) at the text encoder's ``vocab_size``, so every shape is the real one.
    """
    if pretrained and random_init:
        return _random_components(pretrained, gpt2_dir, seed)
    if random_init:
        raise ValueError("random_init needs pretrained: the model (or folder of its config files) to build")
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


def random_init_tokenizer_source(pretrained: str | Path) -> str:
    """Where :func:`load_components` takes the tokenizer of a ``random_init`` model from: ``"tokenizer/"`` when
    ``pretrained`` is a hub name or a local folder with one, otherwise ``"gpt2_words"`` (:func:`build_tiny_tokenizer`
    at the text encoder's vocabulary size)."""
    local = Path(pretrained).expanduser()
    return "tokenizer/" if not local.exists() or (local / "tokenizer").is_dir() else "gpt2_words"


def _random_components(pretrained: str, gpt2_dir: str | Path | None, seed: int) -> SDComponents:
    """:func:`load_components` with ``random_init``: the architectures of ``pretrained``'s config files."""
    local = Path(pretrained).expanduser()
    name = str(local) if local.exists() else pretrained
    if local.exists():
        missing = [f"{part}/{file}" for part, file in CONFIG_FILES.items() if not (local / part / file).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(local)!r} lacks the configuration files {missing} (random_init builds "
                                    "the model from them)")
    tokenizer_source = random_init_tokenizer_source(pretrained)
    if tokenizer_source == "gpt2_words" and gpt2_dir is None:
        raise ValueError(f"{str(local)!r} has no tokenizer/: give gpt2_dir to build one of the model's vocabulary size")
    torch.manual_seed(seed)
    text_config = CLIPTextConfig.from_pretrained(name, subfolder="text_encoder")
    tokenizer = (CLIPTokenizer.from_pretrained(name, subfolder="tokenizer") if tokenizer_source == "tokenizer/" else
                 build_tiny_tokenizer(gpt2_dir, vocab_size=text_config.vocab_size,
                                      model_max_length=text_config.max_position_embeddings))
    return SDComponents(tokenizer, CLIPTextModel(text_config),
                        AutoencoderKL.from_config(AutoencoderKL.load_config(name, subfolder="vae")),
                        UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(name, subfolder="unet")),
                        DDPMScheduler.from_config(DDPMScheduler.load_config(name, subfolder="scheduler")))


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


class EmbeddingRowGuard:
    """What :func:`keep_original_embedding_rows` returns: ``remove()`` undoes it; ``state_dict()`` /
    ``load_state_dict()`` carry which rows are kept (all of them once frozen at the norm threshold), for a
    checkpoint. The kept rows' values are not stored: after every step they equal the weight's own rows, so
    ``load_state_dict`` takes them from the weight, which must already be restored (``harness.Checkpointer`` loads
    the trainable parameters first)."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, handle):
        self.weight, self.keep, self._handle = weight, keep, handle
        self.rows = weight.detach()[keep].clone()

    def remove(self) -> None:
        self._handle.remove()

    def state_dict(self) -> dict:
        return {"keep": self.keep.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["keep"].shape != self.keep.shape:
            raise ValueError(f"the saved rows cover {state['keep'].shape[0]} tokens, this embedding has "
                             f"{self.keep.shape[0]}")
        self.keep = state["keep"].clone()
        self.rows = self.weight.detach()[self.keep.to(self.weight.device)].clone()


def keep_original_embedding_rows(optimizer: torch.optim.Optimizer, embedding: nn.Embedding,
                                 trainable_ids: Sequence[int], freeze_at_norm: float | None = None
                                 ) -> EmbeddingRowGuard:
    """Restore every row of the (trainable) ``embedding`` weight outside ``trainable_ids`` after each step of
    ``optimizer`` (weight decay or momentum could otherwise move them), so only the new tokens learn.

    With ``freeze_at_norm`` the new rows are frozen too once their mean L2 norm reaches it (Mix-of-Show's
    ``emb_norm_threshold``). Returns an :class:`EmbeddingRowGuard` (``.remove()`` to undo; its state goes into a
    checkpoint).
    """
    weight = embedding.weight
    if not any(p is weight for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the embedding weight is not optimized by this optimizer: make it trainable "
                         "(add_concept_tokens(..., trainable=True)) before building the optimizer")
    ids = torch.as_tensor(list(trainable_ids), dtype=torch.long)
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[ids] = False

    def restore(*_):
        with torch.no_grad():
            kept = guard.keep.to(weight.device)
            weight[kept] = guard.rows.to(weight.device, weight.dtype)
            if freeze_at_norm is not None and not kept.all() and weight[ids].norm(dim=-1).mean() >= freeze_at_norm:
                guard.keep = torch.ones_like(guard.keep)
                guard.rows = weight.detach().clone()

    guard = EmbeddingRowGuard(weight, keep, optimizer.register_step_post_hook(restore))
    return guard


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> nn.Module:
    """Inject PEFT LoRA (``lora_A``/``lora_B``, zero-initialised ``B``) into the modules whose names end with one of
    ``targets`` (linear layers and convolutions, e.g. SD's 1x1 ``proj_in``). Only the LoRA factors stay
    trainable; everything else in ``model`` is frozen. The model keeps its own parameter names."""
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


def trainable_counts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a run trains: ``trainable_params`` (elements of every tensor with ``requires_grad``: the LoRA factors
    and, when new token rows train, the whole input embedding, whose other rows are restored after each step) and
    ``lora_pairs``, the (A, B) pairs ``optimizer`` preconditions (its groups' ``pairs``: one per LoRA layer for the
    scaled optimizers; 0 for ``sgd``/``adamw``, which update every factor as a plain parameter)."""
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_pairs": sum(len(group.get("pairs", ())) for group in optimizer.param_groups)}


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
