"""The LoRA optimizers users would otherwise pick, built over the same models for side-by-side runs.

* ``peft_riemannian``: PEFT's ``create_riemannian_optimizer`` wrapping ``torch.optim.AdamW`` (per-pair loop).
* ``loraplus``: PEFT's ``create_loraplus_optimizer`` (AdamW with B's learning rate ``loraplus_lr_ratio`` x A's).
* ``lora_rite``: ``pytorch_optimizer.LoRARite`` (ICLR 2025), fed the pairs of :func:`core.find_lora_pairs` in the
  left/right order it expects; the non-LoRA trainable parameters (a classifier head, say) get AdamW in the same
  optimizer, since LoRA-RITE pairs every two parameters of a group. Its own options pass through
  (:data:`LORA_RITE_OPTIONS`); the factor layout (``lora_l_dim`` / ``lora_r_dim``) follows from the pairing and is
  not an option.

PEFT and pytorch_optimizer are imported when a peer is built, not when this module is: ``import harness`` stays
light for the experiments that never use a peer.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.adamw import adamw

from core import find_lora_pairs

__all__ = ["PEER_NAMES", "PEER_HPARAMS", "LORA_RITE_OPTIONS", "build_peer"]

PEER_NAMES = ("peft_riemannian", "loraplus", "lora_rite")
_ADAM = {"lr", "betas", "eps", "weight_decay"}
# pytorch_optimizer.LoRARite's options besides AdamW's (its defaults in parentheses): relative_epsilon (False: scale
# eps by the largest second-moment eigenvalue), clip_unmagnified_grad (1.0, 0 = off), update_capping (0.0 = off),
# update_skipping (1.0, 0 = off), apply_escape (False), maybe_inf_to_nan (True), balance_param (False).
LORA_RITE_OPTIONS = {
    "relative_epsilon", "clip_unmagnified_grad", "update_capping", "update_skipping", "apply_escape",
    "maybe_inf_to_nan", "balance_param",
}  # fmt: skip
PEER_HPARAMS: dict[str, set[str]] = {
    "peft_riemannian": _ADAM | {"reg"},
    "loraplus": _ADAM | {"loraplus_lr_ratio"},
    "lora_rite": _ADAM | LORA_RITE_OPTIONS,
}


def _lora_rite_class():
    from pytorch_optimizer import LoRARite

    class LoRARiteWithAdamW(LoRARite):
        """LoRA-RITE on the groups flagged ``lora``; AdamW (torch's functional ``adamw``) on the others."""

        @staticmethod
        def iter_lora_pairs(group):
            return LoRARite.iter_lora_pairs(group) if group.get("lora", True) else []

        @torch.no_grad()
        def step(self, closure=None):
            loss = super().step(closure)
            for group in self.param_groups:
                if group.get("lora", True):
                    continue
                params = [p for p in group["params"] if p.grad is not None]
                for p in params:
                    state = self.state[p]
                    if not state:
                        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
                states = [self.state[p] for p in params]
                if params:
                    adamw(
                        params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                        beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    )  # fmt: skip
            return loss

    return LoRARiteWithAdamW


def build_peer(model: nn.Module | Mapping[str, nn.Module], name: str, **hparams: Any) -> torch.optim.Optimizer:
    """Build the peer optimizer ``name`` (see the module docstring) over ``model``'s trainable parameters.

    ``hparams`` are the peer's hyperparameters (:data:`PEER_HPARAMS`); an unknown one is an error.
    """
    if name not in PEER_HPARAMS:
        raise ValueError(f"unknown peer optimizer '{name}'; expected one of {list(PEER_NAMES)}")
    unknown = sorted(set(hparams) - PEER_HPARAMS[name])
    layout = sorted({"lora_l_dim", "lora_r_dim"} & set(unknown)) if name == "lora_rite" else []
    if layout:
        raise ValueError(
            f"{layout} cannot be set for 'lora_rite': the factors are passed as A (rank first) and B (rank last), "
            "the layout of core.find_lora_pairs"
        )
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for optimizer '{name}'; expected some of {sorted(PEER_HPARAMS[name])}"
        )
    if "betas" in hparams:
        hparams["betas"] = tuple(hparams["betas"])
    if isinstance(model, Mapping):
        model = nn.ModuleDict(dict(model))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a dict of them, got {type(model).__name__}")
    if name == "peft_riemannian":
        from peft.optimizers import create_riemannian_optimizer

        return create_riemannian_optimizer(model, torch.optim.AdamW, **hparams)
    if name == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        hparams.setdefault("loraplus_lr_ratio", 16.0)
        return create_loraplus_optimizer(model, torch.optim.AdamW, **hparams)
    pairs = find_lora_pairs(model)
    if not pairs:
        raise ValueError("'lora_rite' needs LoRA factor pairs but none were found among the trainable parameters")
    for pair in pairs:
        if pair.blocks != 1 or pair.A.dim() != 2 or pair.B.dim() != 2:
            raise ValueError(f"'lora_rite' supports plain matrix LoRA pairs only; '{pair.name}' is not one")
    paired = {id(t) for pair in pairs for t in (pair.A, pair.B)}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    groups = [{"params": [t for pair in pairs for t in (pair.A, pair.B)], "lora": True}]
    if plain:
        groups.append({"params": plain, "lora": False})
    return _lora_rite_class()(groups, **hparams)
