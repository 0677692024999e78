"""Tiny models built in code for the core tests (no download)."""

import torch
from torch import nn


def tiny_llama(seed: int = 0, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_peft_llama(seed: int = 0, r: int = 4, init_B: bool = True, targets=("q_proj", "v_proj"), **extra):
    """A PEFT LoRA model; ``init_B`` gives B small random values (PEFT starts it at 0) so tests see real Grams."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **extra))
    if init_B:
        torch.manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                nn.init.normal_(p, std=0.05)
    return model


class LoraDownUp(nn.Module):
    """Diffusion-style LoRA: ``lora_down`` / ``lora_up`` Linear layers beside a frozen base layer."""

    def __init__(self, n: int, m: int, r: int):
        super().__init__()
        self.base = nn.Linear(n, m)
        self.base.requires_grad_(False)
        self.lora_down = nn.Linear(n, r, bias=False)
        self.lora_up = nn.Linear(r, m, bias=False)
        nn.init.normal_(self.lora_up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class MergedLoraLinear(nn.Module):
    """loralib MergedLinear semantics: one fused projection (q, k, v) with LoRA on the enabled blocks only."""

    def __init__(self, n: int, r: int, enable_lora=(True, False, True)):
        super().__init__()
        self.n, self.r, self.enable_lora = n, r, list(enable_lora)
        k = sum(self.enable_lora)
        self.weight = nn.Parameter(torch.randn(3 * n, n) / n**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(k * r, n) / n**0.5)
        self.lora_B = nn.Parameter(torch.randn(k * n, r) * 0.1)

    def delta(self):
        blocks = []
        it = 0
        for enabled in self.enable_lora:
            if enabled:
                a = self.lora_A[it * self.r : (it + 1) * self.r]
                b = self.lora_B[it * self.n : (it + 1) * self.n]
                blocks.append(b @ a)
                it += 1
            else:
                blocks.append(self.lora_B.new_zeros(self.n, self.n))
        return torch.cat(blocks, dim=0)

    def forward(self, x):
        return x @ (self.weight + self.delta()).T


class MixedModel(nn.Module):
    """Two down/up LoRA layers, one merged layer, and a trainable head (a plain parameter)."""

    def __init__(self, n: int = 12, r: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = LoraDownUp(n, n, r)
        self.l2 = LoraDownUp(n, n, r)
        self.merged = MergedLoraLinear(n, r)
        self.head = nn.Linear(3 * n, 2)

    def forward(self, x):
        return self.head(self.merged(torch.tanh(self.l2(torch.tanh(self.l1(x))))))
