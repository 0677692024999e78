"""``build_optimizer``: the one place where experiments turn a model and a config into an optimizer."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .optimizers import ScaledAdamW, ScaledGD
from .pairing import find_lora_pairs

__all__ = ["build_optimizer", "trainer_optimizer", "OPTIMIZER_NAMES", "PEER_NAMES", "HPARAMS"]

OPTIMIZER_NAMES = ("sgd", "scaled_gd", "adamw", "scaled_adamw")  # the paper's four
PEER_NAMES = ("peft_riemannian", "loraplus", "lora_rite")  # what users would otherwise pick

_SGD = {"lr", "weight_decay", "momentum", "check_finite"}
_ADAMW = {"lr", "betas", "eps", "weight_decay", "bias_correction", "check_finite", "fused"}
_ADAM_PEER = {"lr", "betas", "eps", "weight_decay"}
HPARAMS: dict[str, set[str]] = {
    "sgd": _SGD,
    "scaled_gd": _SGD | {"reg"},
    "adamw": _ADAMW,
    "scaled_adamw": _ADAMW | {"reg"},
    "peft_riemannian": _ADAM_PEER | {"reg"},
    "loraplus": _ADAM_PEER | {"loraplus_lr_ratio"},
    "lora_rite": _ADAM_PEER,
}
_GROUP_KEYS = {"lr", "weight_decay", "momentum", "reg", "betas", "eps", "bias_correction"}


def _check_hparams(name: str, hparams: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for optimizer '{name}'{where}; expected some of {sorted(allowed)}"
        )


def _as_module(model: nn.Module | Mapping[str, nn.Module]) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, Mapping):
        return nn.ModuleDict(dict(model))
    raise TypeError(f"model must be an nn.Module or a dict of them, got {type(model).__name__}")


def _owner(param_name: str, prefixes: list[str]) -> str | None:
    """The longest override prefix that ``param_name`` lies under (``None``: the default group)."""
    best = None
    for prefix in prefixes:
        if (param_name == prefix or param_name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def build_optimizer(
    model: nn.Module | Mapping[str, nn.Module],
    name: str,
    *,
    group_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZER_NAMES` (or :data:`PEER_NAMES`) over all trainable parameters of ``model``.

    LoRA pairs (found by :func:`core.find_lora_pairs`) get the preconditioner under ``scaled_gd`` /
    ``scaled_adamw``; every other trainable parameter gets the plain update of the same optimizer, and ``sgd`` /
    ``adamw`` run the same code with the identity preconditioner.

    Args:
        model: the model, or a dict of models (``{"unet": unet, "text_encoder": te}``) optimised together.
        name: ``sgd``, ``scaled_gd``, ``adamw``, ``scaled_adamw``, or a peer: ``peft_riemannian``, ``loraplus``,
            ``lora_rite``.
        group_overrides: per-sub-module settings, keyed by module-name prefix, e.g.
            ``{"text_encoder": {"lr": 1e-2, "reg": 1e6}}``.
        **hparams: the optimizer's hyperparameters (see :data:`HPARAMS`); unknown keys are an error.
    """
    if name not in HPARAMS:
        raise ValueError(f"unknown optimizer '{name}'; expected one of {list(OPTIMIZER_NAMES + PEER_NAMES)}")
    _check_hparams(name, hparams, HPARAMS[name], "")
    if "betas" in hparams:
        hparams["betas"] = tuple(hparams["betas"])
    module = _as_module(model)
    if name in PEER_NAMES:
        if group_overrides:
            raise ValueError(f"group_overrides are not supported for the peer optimizer '{name}'")
        from .peers import build_peer

        return build_peer(module, name, **hparams)

    overrides = {k: dict(v) for k, v in (group_overrides or {}).items()}
    for prefix, values in overrides.items():
        _check_hparams(name, values, HPARAMS[name] & _GROUP_KEYS, f" in group_overrides['{prefix}']")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    prefixes = list(overrides)
    for prefix in prefixes:
        if not any(_owner(n, [prefix]) for n, _ in trainable):
            raise ValueError(f"group_overrides key '{prefix}' matches no trainable parameter of the model")

    scaled = name.startswith("scaled_")
    groups: dict[str | None, dict[str, Any]] = {
        key: {"lora_pairs": [], "params": [], "param_names": [], **overrides.get(key, {})} for key in [None] + prefixes
    }
    paired: set[int] = set()
    if scaled:
        pairs = find_lora_pairs(module)
        if not pairs:
            raise ValueError(
                f"'{name}' needs LoRA factor pairs but none were found among the trainable parameters (expected "
                "PEFT lora_A/lora_B, lora_embedding_A/B, lora_down/lora_up or loralib lora_A/lora_B names); use "
                f"'{name.removeprefix('scaled_').replace('gd', 'sgd')}' for a model without LoRA"
            )
        for pair in pairs:
            key_a, key_b = _owner(pair.a_name, prefixes), _owner(pair.b_name, prefixes)
            if key_a != key_b:
                raise ValueError(f"LoRA pair '{pair.name}' is split across group_overrides keys {key_a!r}, {key_b!r}")
            groups[key_a]["lora_pairs"].append(pair)
            paired.update((id(pair.A), id(pair.B)))
    for param_name, param in trainable:
        if id(param) not in paired:
            group = groups[_owner(param_name, prefixes)]
            group["params"].append(param)
            group["param_names"].append(param_name)

    param_groups = [g for g in groups.values() if g["lora_pairs"] or g["params"]]
    cls = ScaledGD if name in ("sgd", "scaled_gd") else ScaledAdamW
    return cls(param_groups, precondition=scaled, **hparams)


class _TrainerOptimizer:
    """What :func:`trainer_optimizer` returns: ``factory()`` gives the ``(model, **hparams) -> optimizer`` builder."""

    def __init__(self, name: str, build: Callable[..., torch.optim.Optimizer]):
        self.name, self.build = name, build

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return functools.partial(self.build, name=self.name)

    def __repr__(self) -> str:
        return f"trainer_optimizer({self.name!r})"


def trainer_optimizer(
    name: str, build: Callable[..., torch.optim.Optimizer] | None = None
) -> Callable[[], Callable[..., torch.optim.Optimizer]]:
    """The optimizer factory that Transformers' ``Trainer`` takes in ``optimizer_cls_and_kwargs``::

        Trainer(model, args, optimizer_cls_and_kwargs=(trainer_optimizer("scaled_adamw"), {"lr": 5e-5, "reg": 100.0}))

    Trainer calls a first element that is not an ``Optimizer`` subclass as ``factory()(model, **kwargs)`` when it
    creates its optimizer, with the model it trains (under FSDP2, before accelerate shards it and moves the
    optimizer onto the shards), so this builds ``build_optimizer(model, name, **kwargs)``: the LoRA pairs are found
    by name and preconditioned, the other trainable parameters get the plain update. It is the route that works
    where Trainer refuses ``optimizers=(optimizer, scheduler)`` (FSDP), and the scheduler stays Trainer's
    (``lr_scheduler_type``, warm-up) over the optimizer's ``lr``. Handing the class itself,
    ``(ScaledAdamW, {...})``, would give it Trainer's two plain weight-decay groups: nothing would be paired.

    Args:
        name: one of :data:`OPTIMIZER_NAMES`.
        build: what builds it, ``build(model, name=name, **kwargs)``; default :func:`build_optimizer`.
            ``harness.trainer_optimizer`` passes ``harness.build_optimizer`` (the peers too), which checks the name.
    """
    if build is None:
        if name not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {name!r}; expected one of {list(OPTIMIZER_NAMES)}")
        build = build_optimizer
    return _TrainerOptimizer(name, build)
