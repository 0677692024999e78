"""``build_optimizer``: the one place where experiments turn a model and a config into an optimizer."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .optimizers import ScaledAdamW, ScaledGD
from .pairing import find_lora_pairs
from .sharded import check_parameters_not_flattened

__all__ = ["build_optimizer", "trainer_optimizer", "OPTIMIZER_NAMES", "HPARAMS"]

OPTIMIZER_NAMES = ("sgd", "scaled_gd", "adamw", "scaled_adamw")  # the paper's four

_SGD = frozenset({"lr", "weight_decay", "momentum", "check_finite"})
_ADAMW = frozenset({"lr", "betas", "eps", "weight_decay", "bias_correction", "check_finite", "fused"})
# the keyword arguments build_optimizer accepts for each optimizer name
HPARAMS = {"sgd": _SGD, "scaled_gd": _SGD | {"reg"}, "adamw": _ADAMW, "scaled_adamw": _ADAMW | {"reg", "variant"}}
_GROUP_KEYS = {"lr", "weight_decay", "momentum", "reg", "betas", "eps", "bias_correction"}


def _check_hparams(name: str, hparams: Mapping[str, Any], allowed: frozenset[str], where: str = "") -> None:
    unknown = sorted(set(hparams) - allowed)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for optimizer '{name}'{where}; expected some of {sorted(allowed)}"
        )


def _owner(param_name: str, prefixes: list[str]) -> str | None:
    """The longest override prefix that ``param_name`` lies under (``None``: the default group)."""
    owners = [p for p in prefixes if param_name == p or param_name.startswith(p + ".")]
    return max(owners, key=len, default=None)


def build_optimizer(
    model: nn.Module | Mapping[str, nn.Module], name: str, *,
    group_overrides: Mapping[str, Mapping[str, Any]] | None = None, **hparams: Any,
) -> torch.optim.Optimizer:  # fmt: skip
    """Build one of :data:`OPTIMIZER_NAMES` over all trainable parameters of ``model``.

    LoRA pairs (found by :func:`core.find_lora_pairs`) get the preconditioner under ``scaled_gd`` /
    ``scaled_adamw``; every other trainable parameter gets the plain update of the same optimizer, and ``sgd`` /
    ``adamw`` run the same code with the identity preconditioner.

    Args:
        model: the model, or a dict of models (``{"unet": unet, "text_encoder": te}``) optimised together.
        name: ``sgd``, ``scaled_gd``, ``adamw`` or ``scaled_adamw``.
        group_overrides: per-sub-module settings, keyed by module-name prefix, e.g.
            ``{"text_encoder": {"lr": 1e-2, "reg": 1e6}}``.
        **hparams: the optimizer's hyperparameters (see :data:`HPARAMS`); unknown keys are an error.
    """
    if name not in HPARAMS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {list(OPTIMIZER_NAMES)}")
    _check_hparams(name, hparams, HPARAMS[name])
    if not isinstance(model, (nn.Module, Mapping)):
        raise TypeError(f"model must be an nn.Module or a dict of them, got {type(model).__name__}")
    module = model if isinstance(model, nn.Module) else nn.ModuleDict(dict(model))
    overrides = {k: dict(v) for k, v in (group_overrides or {}).items()}
    for prefix, values in overrides.items():
        _check_hparams(name, values, HPARAMS[name] & _GROUP_KEYS, f" in group_overrides['{prefix}']")
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    prefixes = list(overrides)
    for prefix in prefixes:
        if not any(_owner(n, [prefix]) for n, _ in trainable):
            raise ValueError(f"group_overrides key '{prefix}' matches no trainable parameter of the model")
    groups: dict[str | None, dict[str, Any]] = {
        key: {"lora_pairs": [], "params": [], "param_names": [], **overrides.get(key, {})} for key in [None] + prefixes
    }
    paired: set[int] = set()
    scaled = name.startswith("scaled_")
    if scaled:
        check_parameters_not_flattened(trainable)  # FSDP1's FlatParameter, DeepSpeed's partitions: no pairs left
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
    optimizer = cls(param_groups, precondition=scaled, **hparams)
    optimizer.watch_unheld_gradients(module)  # a parameter that starts training later is warned of, once
    return optimizer


def _build_for_trainer(build: Callable[..., torch.optim.Optimizer], name: str, model: nn.Module,
                       **hparams: Any) -> torch.optim.Optimizer:
    """What Trainer calls: ``build(model, name=name, **hparams)``, once ``hparams`` give the learning rate. Trainer
    hands a factory none of its ``TrainingArguments``, so without ``lr`` the optimizer would train at its class
    default whatever ``learning_rate`` says: refused."""
    if "lr" not in hparams:
        raise ValueError(
            f"trainer_optimizer({name!r}) was called without 'lr': Trainer passes an optimizer factory only the kwargs "
            f"of optimizer_cls_and_kwargs, not TrainingArguments' learning_rate or weight_decay. Give them there, e.g. "
            f"optimizer_cls_and_kwargs=(trainer_optimizer({name!r}), {{'lr': args.learning_rate, 'weight_decay': "
            f"args.weight_decay, ...}})"
        )
    return build(model, name=name, **hparams)


class _TrainerOptimizer:
    """What :func:`trainer_optimizer` returns: ``factory()`` gives the ``(model, **hparams) -> optimizer`` builder."""

    def __init__(self, name: str, build: Callable[..., torch.optim.Optimizer]):
        self.name, self.build = name, build

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return functools.partial(_build_for_trainer, self.build, self.name)

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
