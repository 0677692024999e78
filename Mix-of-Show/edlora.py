"""EDLoRA's layer-wise token embeddings (Mix-of-Show, Gu et al. 2023) on diffusers' attention processors.

Each concept token (``<V1>``, ``<V2>``) is decomposed into one new token per cross-attention layer of the UNet,
``<V1_l0>`` ... ``<V1_l{L-1}>``, each with its own trainable embedding row. A prompt is encoded L times, the
l-th time with layer l's tokens in place of the concept tokens, which gives a (L, T, D) conditioning; the
processor of the l-th cross-attention layer (UNet order: down, mid, up blocks) reads slice l. Prompts without
concept tokens (the empty prompt of classifier-free guidance) are the same in every layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def cross_attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The cross-attention modules (``attn2``) of a diffusers UNet in the order down, mid, up blocks."""
    found = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        block = getattr(unet, part, None)
        if block is None:
            continue
        found += [(f"{part}.{name}", m) for name, m in block.named_modules()
                  if name.split(".")[-1] == "attn2" and hasattr(m, "set_processor")]
    if not found:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers")
    return found


class LayerwiseAttnProcessor:
    """Wraps an attention processor: a 4-D ``encoder_hidden_states`` (B, L, T, D) is cut to its layer slice
    (B, T, D) before the wrapped processor runs; a 3-D one passes unchanged."""

    def __init__(self, layer_index: int, base):
        self.layer_index, self.base = layer_index, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.dim() == 4:
            if encoder_hidden_states.shape[1] <= self.layer_index:
                raise ValueError(f"conditioning has {encoder_hidden_states.shape[1]} layers, "
                                 f"cross-attention layer {self.layer_index} needs more")
            encoder_hidden_states = encoder_hidden_states[:, self.layer_index]
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def enable_layerwise_conditioning(unet: nn.Module) -> int:
    """Give every cross-attention layer of ``unet`` its :class:`LayerwiseAttnProcessor`; return their number L."""
    layers = cross_attention_modules(unet)
    for index, (_, module) in enumerate(layers):
        module.set_processor(LayerwiseAttnProcessor(index, module.processor))
    return len(layers)


def layer_tokens(concept_tokens: Sequence[str], num_layers: int) -> list[list[str]]:
    """``[[<V1_l0>, ..., <V1_l{L-1}>], [<V2_l0>, ...]]``: the per-layer tokens of each concept token."""
    for token in concept_tokens:
        if not (token.startswith("<") and token.endswith(">")):
            raise ValueError(f"concept token {token!r} must look like <name>")
    return [[f"{t[:-1]}_l{layer}>" for layer in range(num_layers)] for t in concept_tokens]


def bind_prompts(prompts: Sequence[str], concept_tokens: Sequence[str], num_layers: int) -> list[list[str]]:
    """For each prompt, its ``num_layers`` layer versions (concept tokens replaced by that layer's tokens)."""
    per_layer = layer_tokens(concept_tokens, num_layers)
    bound = []
    for prompt in prompts:
        versions = []
        for layer in range(num_layers):
            text = prompt
            for token, names in zip(concept_tokens, per_layer):
                text = text.replace(token, names[layer])
            versions.append(text)
        bound.append(versions)
    return bound


def tokenize_layerwise(tokenizer, prompts: Sequence[str], concept_tokens: Sequence[str],
                       num_layers: int) -> torch.Tensor:
    """(B, L, T) token ids: prompt b as seen by cross-attention layer l."""
    bound = bind_prompts(prompts, concept_tokens, num_layers)
    flat = [text for versions in bound for text in versions]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.view(len(prompts), num_layers, -1)
