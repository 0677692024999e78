"""LoRA placement: loralib-style merged LoRA on GPT-2's fused ``c_attn`` (q and v only), or PEFT by module name.

GPT-2 computes q, k and v with one fused projection ``c_attn`` (a ``Conv1D`` of out width 3 d). The paper (after
LoRA, Hu et al. 2021) adapts q and v only, with loralib's ``MergedLinear(enable_lora=[True, False, True])``:
``lora_A`` is (2 r, n), ``lora_B`` is (2 d, r), block i is ``lora_B[i d:(i+1) d] @ lora_A[i r:(i+1) r]`` and the
k slice gets no update. :class:`MergedLoRA` reproduces that module (names, shapes, init, scaling ``alpha / r``,
dropout on the input of the LoRA path) around an existing ``Conv1D`` or ``nn.Linear``; ``core.find_lora_pairs``
reads its ``enable_lora`` and gives each block its own r x r preconditioner. Trainable parameters per layer:
``2 r (n + d)`` (393,216 for GPT-2 medium at r = 4, LoRA's 0.35M). Checked against loralib 0.1.2's
``MergedLinear(fan_in_fan_out=True)``: same parameter shapes and counts, same outputs up to float32 rounding.

Models with separate projections (SmolLM2 / Llama: ``q_proj``, ``v_proj``) use PEFT's ``LoraConfig`` instead.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PLACEMENTS = ("merged_qv", "peft")


class MergedLoRA(nn.Module):
    """A frozen fused projection plus loralib ``MergedLinear`` LoRA on the enabled output slices.

    Args:
        base: ``transformers`` ``Conv1D`` (weight n x out) or ``nn.Linear`` (weight out x n); frozen here.
        r: rank of each block; alpha: scaling numerator (update is ``alpha / r * B A x``); dropout: on ``x``.
        enable_lora: one flag per equal output slice, e.g. ``[True, False, True]`` for q, k, v.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, enable_lora: Sequence[bool]):
        super().__init__()
        if isinstance(base, Conv1D):
            n, out = base.weight.shape
        elif isinstance(base, nn.Linear):
            out, n = base.weight.shape
        else:
            raise TypeError(f"MergedLoRA wraps a Conv1D or nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if out % len(enable_lora) or not any(enable_lora):
            raise ValueError(f"enable_lora={list(enable_lora)} does not split the output width {out} into slices")
        self.base = base.requires_grad_(False)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.r, self.scaling, self.slice = r, alpha / r, out // len(enable_lora)
        k = sum(self.enable_lora)
        self.lora_A = nn.Parameter(base.weight.new_empty(k * r, n))
        self.lora_B = nn.Parameter(base.weight.new_zeros(k * self.slice, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib's init; B = 0 so the start is the base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update ``scaling * B A x`` of every enabled slice, zeros in the others (width ``out``)."""
        k = sum(self.enable_lora)
        after_a = (self.lora_dropout(x) @ self.lora_A.t()).unflatten(-1, (k, self.r))  # (..., k, r)
        blocks = torch.einsum("...kr,kdr->...kd", after_a, self.lora_B.view(k, self.slice, self.r))
        it = iter(blocks.unbind(-2))
        zero = None
        parts = []
        for enabled in self.enable_lora:
            if enabled:
                parts.append(next(it))
            else:
                zero = x.new_zeros(*x.shape[:-1], self.slice) if zero is None else zero
                parts.append(zero)
        return torch.cat(parts, dim=-1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, enable_lora={self.enable_lora}"


def add_merged_lora(model: nn.Module, target: str, r: int, alpha: float, dropout: float,
                    enable_lora: Sequence[bool]) -> list[str]:
    """Wrap every sub-module whose name ends with ``target`` in :class:`MergedLoRA`; return the wrapped names."""
    names = [name for name, module in model.named_modules()
             if name.split(".")[-1] == target and isinstance(module, (Conv1D, nn.Linear))]
    if not names:
        raise ValueError(f"lora.target_modules: no Conv1D/Linear module named {target!r} in {type(model).__name__}")
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, MergedLoRA(getattr(holder, child), r, alpha, dropout, enable_lora))
    return names


def apply_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """Freeze ``model`` and add LoRA as ``cfg`` (``conf/config.yaml``, ``lora:``) says; return the model to train.

    ``merged_qv``: :class:`MergedLoRA` on each module named ``cfg.target_modules[0]`` (GPT-2: ``c_attn``) with
    ``cfg.enable_lora``. ``peft``: ``peft.get_peft_model`` with ``LoraConfig(target_modules=cfg.target_modules)``.
    """
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"unknown lora.placement {cfg.placement!r}; expected one of {PLACEMENTS}")
    model.requires_grad_(False)
    targets = list(cfg.target_modules)
    if cfg.placement == "merged_qv":
        if len(targets) != 1:
            raise ValueError(f"lora.placement=merged_qv wraps one fused module, got target_modules={targets}")
        add_merged_lora(model, targets[0], int(cfg.r), float(cfg.alpha), float(cfg.dropout), list(cfg.enable_lora))
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(cfg.r), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
