"""``harness.build_optimizer``: the paper's four optimizers (from :mod:`core`) and the peers (:mod:`harness.peers`)
behind one name, for the experiments that compare them.

>>> optimizer = build_optimizer(model, "lora_rite", lr=2e-4)          # a peer
>>> optimizer = build_optimizer(model, "scaled_adamw", lr=8e-4, reg=1e-6)   # = core.build_optimizer(...)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

import core

from .peers import PEER_HPARAMS, PEER_NAMES, build_peer

__all__ = ["OPTIMIZER_NAMES", "PEER_NAMES", "ALL_OPTIMIZERS", "HPARAMS", "build_optimizer", "trainer_optimizer"]

OPTIMIZER_NAMES: tuple[str, ...] = tuple(core.OPTIMIZER_NAMES)  # the paper's four
ALL_OPTIMIZERS: tuple[str, ...] = OPTIMIZER_NAMES + PEER_NAMES
HPARAMS: dict[str, set[str]] = {**{name: core.HPARAMS[name] for name in OPTIMIZER_NAMES}, **PEER_HPARAMS}


def build_optimizer(
    model: nn.Module | Mapping[str, nn.Module],
    name: str,
    *,
    group_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (one of :data:`ALL_OPTIMIZERS`) over ``model``'s trainable parameters.

    The paper's four go to :func:`core.build_optimizer` with every argument as given; a peer is built by
    :func:`harness.peers.build_peer`, which takes no ``group_overrides``.
    """
    if name in PEER_NAMES:
        if group_overrides:
            raise ValueError(f"group_overrides are not supported for the peer optimizer '{name}'")
        return build_peer(model, name, **hparams)
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer '{name}'; expected one of {list(ALL_OPTIMIZERS)}")
    return core.build_optimizer(model, name, group_overrides=group_overrides, **hparams)


def trainer_optimizer(name: str):
    """:func:`core.trainer_optimizer` for any of :data:`ALL_OPTIMIZERS`, built by :func:`build_optimizer`::

        Trainer(model, args, optimizer_cls_and_kwargs=(trainer_optimizer("loraplus"), {"lr": 2e-4}))
    """
    if name not in ALL_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(ALL_OPTIMIZERS)}")
    return core.trainer_optimizer(name, build=build_optimizer)
