"""Scaled GD and scaled AdamW for LoRA: the Riemannian preconditioner, then torch's SGD or AdamW update.

A step turns each group's gradients into update directions (the LoRA pairs' through
:func:`core.preconditioner.preconditioned_directions` with ``precondition=True``; every other parameter's, and all
of them with ``precondition=False``, are the gradients themselves), checks that they are finite, and only then
hands them to torch's functional ``torch.optim.sgd.sgd`` / ``torch.optim.adamw.adamw`` in place of the gradients
(public tensor operations cover what those have no flag for). Parameter groups take torch's keys plus
``lora_pairs`` (:class:`core.pairing.LoraPair` s or ``(A, B[, blocks])`` tuples), kept as ``pairs = [[index_A,
index_B, blocks], ...]`` into ``params`` beside ``param_names``, so ``state_dict()`` / ``load_state_dict()`` work.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
import weakref
from collections.abc import Sequence as SequenceABC
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from ._workspace import Workspace
from .pairing import LoraPair, check_pair, pair_named_parameters
from .preconditioner import compute_dtype, direction_dtype, preconditioned_directions
from .sharded import all_finite, check_not_flattened, check_sharding, sharded_directions

__all__ = ["ScaledGD", "ScaledAdamW", "NonFiniteGradientError", "UnheldGradientWarning", "sgd_update",
           "adam_normalised_step"]
VARIANTS = ("gradient", "update")


class NonFiniteGradientError(FloatingPointError):
    """A gradient (or the update direction made from a finite one) holds inf or NaN; raised before any change."""


class UnheldGradientWarning(UserWarning):
    """Trainable parameters of the model have gradients but are not in the optimizer (warned once, at step())."""


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _as_pair(value: Any) -> Any:
    """A sequence (list, tuple, a config's list) as a tuple; anything else as it is, for the check to report."""
    return tuple(value) if isinstance(value, SequenceABC) and not isinstance(value, str) else value


def sgd_update(
    params: list[Tensor], directions: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float,
    weight_decay: float, momentum: float,
) -> None:  # fmt: skip
    """``p <- p (1 - lr wd) - lr d``, with ``buf <- momentum buf + d`` (``buf = d`` at first) in place of d.

    torch's SGD functional (which fills the ``None`` buffers), its weight decay (which would enter the momentum)
    replaced by the decoupled one, applied first.
    """
    if weight_decay:
        for p in params:
            p.mul_(1.0 - lr * weight_decay)
    sgd(
        params, directions, momentum_buffers, foreach=True, weight_decay=0.0, momentum=momentum, lr=lr,
        dampening=0.0, nesterov=False, maximize=False,
    )  # fmt: skip


def adam_normalised_step(
    grads: Sequence[Tensor], exp_avgs: Sequence[Tensor | None], exp_avg_sqs: Sequence[Tensor | None],
    steps: Sequence[float], *, beta1: float, beta2: float, eps: float, bias_correction: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:  # fmt: skip
    """Adam's normalised step ``u = m̂ / (sqrt(v̂) + eps)`` of each gradient g at step number t (counted from 1)::

        m <- β1 m + (1 - β1) g;   v <- β2 v + (1 - β2) g²;   m̂ = m / (1 - β1^t);   v̂ = v / (1 - β2^t)

    (m̂ = m, v̂ = v without bias correction; ``None`` moments are zeros), computed in float32 (float64 for float64
    gradients) as torch's fused AdamW does. Returns new tensors ``(u, m, v)`` in the
    :func:`~core.preconditioner.direction_dtype` of the gradients (float32 for float16 ones, whose squares underflow).
    """
    us, ms, vs = [], [], []
    for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, steps):
        g32 = g.to(compute_dtype(g.dtype))
        m = torch.lerp(torch.zeros_like(g32) if m is None else m.to(g32.dtype), g32, 1.0 - beta1)
        v = torch.addcmul((torch.zeros_like(g32) if v is None else v.to(g32.dtype)) * beta2, g32, g32, value=1 - beta2)
        c1, c2 = (1.0 - beta1**t, 1.0 - beta2**t) if bias_correction else (1.0, 1.0)
        dtype = direction_dtype(g.dtype)
        us.append(((m / c1) / (v.sqrt() / c2**0.5 + eps)).to(dtype))
        ms.append(m.to(dtype))
        vs.append(v.to(dtype))
    return us, ms, vs


_GENERATED_NAME = re.compile(r"^(param\d+|lora_pairs\.\d+\.[AB])$")  # the names of _normalize_group for unnamed ones


def _split_names(plain: list, plain_names: list[str] | None) -> tuple[list, list[str] | None]:
    """``params`` given as ``(name, tensor)`` entries (``model.named_parameters()``) as tensors and names."""
    named = [isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in plain]
    if not any(named):
        return plain, plain_names
    if not all(named):
        raise ValueError("params mixes (name, tensor) entries with unnamed tensors; give all of them names or none")
    if plain_names is not None:
        raise ValueError("params are (name, tensor) entries and param_names is given too; give the names once")
    return [p for _, p in plain], [n for n, _ in plain]


def _normalize_group(group: dict, precondition: bool) -> dict:
    """Turn a user group with ``lora_pairs`` into ``params`` + ``pairs`` (index triples) + ``param_names``.

    Named ``params`` (``(name, tensor)`` entries, e.g. ``model.named_parameters()``) are paired by name under
    ``precondition`` (:func:`core.pairing.pair_named_parameters`, the rules of ``find_lora_pairs``: trainable
    factors only), each parameter keeping its place in ``params``.
    """
    group = dict(group)
    plain = group.pop("params", [])
    plain = [plain] if isinstance(plain, Tensor) else list(plain)
    plain, plain_names = _split_names(plain, group.pop("param_names", None))
    lora_pairs = list(group.pop("lora_pairs", []))
    if plain_names is not None and len(plain_names) != len(plain):
        raise ValueError(f"param_names has {len(plain_names)} entries for {len(plain)} params")
    if "pairs" in group:  # already normalised (a group handed back to add_param_group)
        if lora_pairs:
            raise ValueError("a parameter group may give 'pairs' (indices) or 'lora_pairs', not both")
        group["params"], group["param_names"] = plain, plain_names or [f"param{i}" for i in range(len(plain))]
        return group
    found = []  # pairs among named params, which keep their places (a torch optimizer's state loads by position)
    if precondition and plain_names is not None:  # trainable factors only, as find_lora_pairs
        found = pair_named_parameters((n, p) for n, p in zip(plain_names, plain) if p.requires_grad)
    params, names, index_pairs = [], [], []
    for i, pair in enumerate(lora_pairs):
        if isinstance(pair, LoraPair):
            A, B, blocks, a_name, b_name, given_order = pair.A, pair.B, pair.blocks, pair.a_name, pair.b_name, False
        elif isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
            A, B, blocks = pair[0], pair[1], (pair[2] if len(pair) == 3 else 1)
            a_name, b_name, given_order = f"lora_pairs.{i}.A", f"lora_pairs.{i}.B", True
        else:
            raise TypeError(f"lora_pairs entries must be LoraPair or (A, B[, blocks]) tuples, got {type(pair)}")
        check_pair(a_name.rsplit(".", 1)[0], A, B, blocks, given_order=given_order)
        index_pairs.append([len(params), len(params) + 1, int(blocks)])
        params += [A, B]
        names += [a_name, b_name]
    position = {id(p): len(params) + i for i, p in enumerate(plain)}
    index_pairs += [[position[id(pair.A)], position[id(pair.B)], pair.blocks] for pair in found]
    names += plain_names if plain_names is not None else [f"param{len(params) + i}" for i in range(len(plain))]
    params += plain
    if len(set(params)) != len(params):
        raise ValueError("a parameter appears twice in one group (as a LoRA factor and as a plain parameter?)")
    group.update(params=params, pairs=index_pairs, param_names=names)
    return group


def _unpaired(count: int, index_pairs: list[list[int]]) -> list[int]:
    """The indices in ``range(count)`` of no LoRA factor of ``index_pairs``."""
    factors = {i for a, b, _ in index_pairs for i in (a, b)}
    return [i for i in range(count) if i not in factors]


class _Step(NamedTuple):
    """One group's step, prepared before anything changes: the ``indices`` of the parameters with a gradient, those
    ``params``, their update ``directions`` and, where AdamW's moments are computed here, the new ``moments``."""

    indices: list[int]
    params: list[Tensor]
    directions: list[Tensor]
    moments: tuple | None = None


class _LoraOptimizer(torch.optim.Optimizer):
    """What both optimizers share: groups with LoRA pairs, the update directions, the finiteness check."""

    def __init__(self, params: Iterable, defaults: dict, precondition: bool, check_finite: bool):
        self.precondition, self.check_finite = precondition, check_finite
        self._hyperparameters = tuple(defaults)  # this class's; others may add to self.defaults (accelerate does)
        self._unheld: weakref.ref | None = None  # the module whose unheld gradients step() warns of, once
        self._unheld_params: list | None = None  # its parameters this optimizer does not hold
        self._materialised = False  # whether every parameter was found off the meta device
        self._workspaces: dict[int, Workspace] = {}  # per group, the batched preconditioner's (see core._workspace)
        self._pair_shapes: dict[int, list] = {}  # per group, the factor shapes last checked to chain
        params = list(params)
        if params and all(isinstance(p, LoraPair) for p in params):
            params = [{"lora_pairs": params}]
        elif params and not isinstance(params[0], dict):
            params = [{"params": params}]
        super().__init__(params, defaults)
        if precondition and not any(group["pairs"] for group in self.param_groups):
            self._raise_no_pairs()

    def _raise_no_pairs(self) -> None:
        """Refuse a preconditioned optimizer without LoRA pairs, which would silently be plain SGD / AdamW."""
        cls, count = type(self).__name__, sum(len(g["params"]) for g in self.param_groups)
        name = {"ScaledGD": "scaled_gd", "ScaledAdamW": "scaled_adamw"}.get(cls.removesuffix("Reference"), "...")
        raise ValueError(
            f"{cls} got {count} parameter(s) in {len(self.param_groups)} group(s) but no LoRA pairs, so it would train "
            f"them with the plain update and no preconditioner; give it the pairs: {cls}(core.find_lora_pairs(model), "
            f"...), {cls}(model.named_parameters(), ...) (paired by name), groups with 'lora_pairs', or "
            f"core.build_optimizer(model, '{name}', ...); precondition=False makes it the plain optimizer on purpose"
        )

    # Keys a parameter group may hold besides the hyperparameters (self.defaults): the inputs of _normalize_group,
    # what it makes of them, and what torch's own code adds (a name, the schedulers' initial_lr).
    _GROUP_EXTRA_KEYS = frozenset({"params", "lora_pairs", "pairs", "param_names", "name", "initial_lr"})
    # Hyperparameters added after states were first saved, with the value of the code before them: a saved state
    # without one was trained with that value and loads with it.
    _ADDED_HYPERPARAMETERS: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        """torch.optim's state (defaults, state, groups) and this class's settings; the caches are rebuilt."""
        return {**super().__getstate__(), "precondition": self.precondition, "check_finite": self.check_finite,
                "_hyperparameters": self._hyperparameters}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._workspaces, self._pair_shapes = {}, {}
        self._unheld, self._unheld_params = None, None  # a copy watches no model: a weak reference does not copy
        self._materialised = False

    def watch_unheld_gradients(self, module: nn.Module) -> None:
        """Warn once, at :meth:`step`, when a parameter of ``module`` that this optimizer does not hold has a
        gradient: it would never be stepped (a PEFT ``set_adapter`` to another adapter, a layer unfrozen after the
        optimizer was built). :func:`core.build_optimizer` calls it with the model it was built over. A step looks
        only at the ``.grad`` of the parameters it does not hold (listed once); the list is made again at steps
        1, 2, 4, 8, ..., which finds parameters added to the model later (a new adapter)."""
        self._unheld = weakref.ref(module)
        self._unheld_steps, self._unheld_params = 0, None

    def _unheld_list(self, module: nn.Module) -> list[tuple[str, Tensor]]:
        held = {id(p) for group in self.param_groups for p in group["params"]}
        return [(n, p) for n, p in module.named_parameters() if id(p) not in held]

    def _warn_unheld_gradients(self) -> None:
        module = self._unheld() if self._unheld is not None else None
        if module is None:
            return
        self._unheld_steps += 1
        if self._unheld_params is None or self._unheld_steps & (self._unheld_steps - 1) == 0:
            self._unheld_params = self._unheld_list(module)
        if not any(p.grad is not None for _, p in self._unheld_params):
            return
        names = [n for n, p in self._unheld_params if p.grad is not None]
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warnings.warn(f"{len(names)} trainable parameter(s) of the model have gradients but are not in this "
                          f"{type(self).__name__}, so they are never stepped: {shown}. Build the optimizer after "
                          "choosing what trains (PEFT set_adapter, unfreezing), or add them with add_param_group",
                          UnheldGradientWarning, stacklevel=3)  # fmt: skip
            self._unheld, self._unheld_params = None, None  # once

    def _check_materialised(self) -> None:
        """Refuse parameters on the meta device (no data) by name; once none is, later steps skip the check (a
        materialised parameter does not go back to meta)."""
        for gi, group in enumerate(self.param_groups):
            for p, name in zip(group["params"], group["param_names"]):
                if p.is_meta:
                    raise ValueError(f"parameter group {gi}, parameter '{name}' is on the meta device (no data): "
                                     "materialise the model before stepping (e.g. model.to_empty(device=...) and "
                                     "load its weights)")  # fmt: skip
        self._materialised = True

    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        self._materialised = False  # the new group's parameters are checked at the next step
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group is a dict, got {type(param_group).__name__}")
        unknown = sorted(set(param_group) - set(self.defaults) - self._GROUP_EXTRA_KEYS)
        if unknown:
            raise ValueError(f"parameter group {index} has unknown key(s) {unknown}; a group of "
                             f"{type(self).__name__} may set {sorted(self._hyperparameters)} besides 'params', "
                             "'lora_pairs' and 'param_names'")  # fmt: skip
        group = _normalize_group(param_group, self.precondition)
        if self.precondition and "lora_pairs" in param_group and not group["params"]:
            raise ValueError(f"parameter group {index} has an empty 'lora_pairs' list and no 'params'")
        super().add_param_group(group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._workspaces.clear()
        self._pair_shapes.clear()

    def _check_group(self, group: dict) -> None:
        for key in ("lr", "weight_decay", "reg"):
            _check_nonnegative(key, group[key])
        if self.precondition:
            check_not_flattened(group)
        check_sharding(group)

    # -- load_state_dict: everything is checked before anything changes ----------------------------------------------
    _STATE_COMPLETE = True  # every entry of _state_spec is in a parameter's state once it has one

    def _state_spec(self, p: Tensor) -> dict[str, torch.dtype | None]:
        """The per-parameter state entries of ``p`` and their dtypes (``None``: a step count)."""
        raise TypeError(f"{type(self).__name__} defines no state layout (_state_spec)")

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, after checking all of it against this optimizer.

        Raises ``ValueError`` naming the first mismatch, before anything changes: the optimizer type (the saved
        groups' hyperparameters), the number and sizes of the groups, the pairing (the saved ``pairs`` must be the
        current ones; a saved pairing is never adopted), the saved hyperparameters' values, and the shape and dtype
        of every state tensor against its parameter (a dtype that widens losslessly, e.g. float16 -> float32, is
        accepted). :class:`ScaledAdamW` also loads a ``torch.optim.AdamW`` state (see :meth:`_foreign_group`).
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"not an optimizer state dict (expected the keys 'state' and 'param_groups'), got "
                             f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"cannot load the optimizer state: it has {len(saved_groups)} parameter group(s), this "
                             f"{type(self).__name__} has {len(self.param_groups)}")  # fmt: skip
        groups = [self._loaded_group(gi, group, saved) for gi, (group, saved) in enumerate(zip(self.param_groups,
                                                                                                 saved_groups))]
        listed = {pid for saved in saved_groups for pid in saved["params"]}
        if set(saved_state) - listed:
            raise ValueError(f"cannot load the optimizer state: it holds state for parameter id(s) "
                             f"{sorted(set(saved_state) - listed)[:5]} that no saved group lists")  # fmt: skip
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for pid, p, name in zip(saved["params"], group["params"], group["param_names"]):
                if pid in saved_state:
                    self._check_saved_state(f"parameter group {gi}, parameter '{name}'", p, saved_state[pid])
        super().load_state_dict({**state_dict, "param_groups": groups})
        for group, saved in zip(self.param_groups, saved_groups):  # torch casts the state to the parameter's dtype
            for pid, p in zip(saved["params"], group["params"]):
                for key, dtype in self._state_spec(p).items() if pid in saved_state else ():
                    value = saved_state[pid].get(key)
                    if dtype is not None and isinstance(value, Tensor) and self.state[p][key].dtype != dtype:
                        self.state[p][key] = value.to(device=p.device, dtype=dtype)
        self._workspaces.clear()
        self._pair_shapes.clear()

    def _loaded_group(self, gi: int, group: dict, saved: dict) -> dict:
        """The saved group ``gi`` as it will be loaded (saved ids in ``params``), checked against ``group``."""
        where, cls = f"cannot load the optimizer state: parameter group {gi}", type(self).__name__
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} has {len(saved['params'])} parameter(s) in the saved state, "
                             f"{len(group['params'])} in this optimizer")  # fmt: skip
        for i, (ours, theirs) in enumerate(zip(group["param_names"], saved.get("param_names") or [])):
            if ours != theirs and not (_GENERATED_NAME.match(ours) or _GENERATED_NAME.match(str(theirs))):
                raise ValueError(f"{where}: parameter {i} is '{theirs}' in the saved state but '{ours}' here (a "
                                 "state is loaded by position: the parameters must come in the same order)")
        if "pairs" not in saved:  # a state of another optimizer (torch's)
            loaded = self._foreign_group(where, group, saved)
        else:
            missing = sorted(set(self._hyperparameters) - set(saved))
            if missing and set(missing) <= set(self._ADDED_HYPERPARAMETERS):  # saved before these existed
                saved = {**{k: self._ADDED_HYPERPARAMETERS[k] for k in missing}, **saved}
                missing = []
            if missing:
                kind = ("an AdamW-type optimizer" if "betas" in saved else "an SGD-type optimizer" if "momentum" in
                        saved else "another optimizer")  # fmt: skip
                raise ValueError(f"{where}: the saved state is of {kind}, not of {cls}: it lacks the "
                                 f"hyperparameter(s) {missing}")  # fmt: skip
            pairs = [[int(i) for i in pair] for pair in saved["pairs"]]
            names = group["param_names"]
            for k, (ours, theirs) in enumerate(itertools.zip_longest(group["pairs"], pairs)):
                if ours != theirs:
                    current = "none" if ours is None else f"'{names[ours[0]]}' / '{names[ours[1]]}' {ours}"
                    raise ValueError(f"{where}: LoRA pair {k} differs: this optimizer has {current}, the saved state "
                                     f"{theirs if theirs is not None else 'none'} ([index_A, index_B, blocks]); a "
                                     "saved pairing is never adopted")  # fmt: skip
            loaded = {**saved, "pairs": group["pairs"], "param_names": group["param_names"]}
        loaded["params"] = group["params"]
        try:
            self._check_group(loaded)
        except ValueError as error:
            raise ValueError(f"{where}: the saved hyperparameters are invalid: {error}") from None
        return {**loaded, "params": saved["params"]}

    def _foreign_group(self, where: str, group: dict, saved: dict) -> dict:
        """A group of a saved state without ``pairs``; only :class:`ScaledAdamW` takes one (torch's AdamW's)."""
        raise ValueError(f"{where}: the saved state has no 'pairs', so it is not a {type(self).__name__} state "
                         f"(hyperparameters {sorted(k for k in saved if k != 'params')})")  # fmt: skip

    def _check_saved_state(self, where: str, p: Tensor, entry: Any) -> None:
        spec = self._state_spec(p)
        if not isinstance(entry, dict):
            raise ValueError(
                f"cannot load the optimizer state: {where}: the state is {type(entry).__name__}, not a dict"
            )
        unknown = sorted(set(entry) - set(spec), key=str)
        missing = sorted(set(spec) - set(entry)) if self._STATE_COMPLETE else []
        if unknown or missing:
            raise ValueError(f"cannot load the optimizer state: {where}: the state has the entries "
                             f"{sorted(entry, key=str)}, expected {sorted(spec)} (unknown: {unknown}, missing: "
                             f"{missing})")  # fmt: skip
        for key, dtype in spec.items():
            value = entry.get(key)
            if key == "step" and (isinstance(value, (int, float)) or isinstance(value, Tensor) and value.numel() == 1):
                continue
            if value is None and not self._STATE_COMPLETE:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"cannot load the optimizer state: {where}: {key} is {value!r}, not a tensor")
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"cannot load the optimizer state: {where}: {key} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(p.shape)} (the parameter's; did the model, e.g. its LoRA rank, "
                                 "change?)")  # fmt: skip
            if not value.is_floating_point() or torch.promote_types(value.dtype, dtype) != dtype:
                raise ValueError(f"cannot load the optimizer state: {where}: {key} is {value.dtype}, expected {dtype} "
                                 f"(for a {p.dtype} parameter)")  # fmt: skip

    def _gradients(self, group: dict) -> list[Tensor | None]:
        grads = [p.grad for p in group["params"]]
        for g, name in zip(grads, group["param_names"]):
            if g is not None and g.layout != torch.strided:
                raise ValueError(f"sparse gradients are not supported (parameter '{name}')")
        return grads

    def _directions(self, gi: int, group: dict, vectors: list[Tensor | None], sums: list | None) -> list:
        """The update directions of ``vectors`` (one per parameter of the group, ``None`` where it has no gradient):
        preconditioned for the LoRA pairs, the vectors themselves (contiguous) for the other parameters."""
        if self.precondition:  # an engine may have swapped the parameters since construction
            check_not_flattened(group)
        mesh = check_sharding(group)
        if mesh is not None:  # DTensors of FSDP2: see core.sharded
            plain_pairs = lambda pairs, grads: preconditioned_directions(pairs, grads, group["reg"])  # noqa: E731
            return sharded_directions(group, vectors, self.precondition, mesh, sums, plain_pairs)
        directions, plain = list(vectors), range(len(vectors))
        if self.precondition and group["pairs"]:
            params, index_pairs = group["params"], group["pairs"]
            self._check_pair_shapes(gi, group)
            work = self._workspaces.setdefault(gi, Workspace())
            pairs = work.memo("pairs", None, lambda: [(params[a], params[b], k) for a, b, k in index_pairs])
            per_pair = preconditioned_directions(
                pairs, [(vectors[a], vectors[b]) for a, b, _ in index_pairs], group["reg"], batched=True,
                workspace=work, sums=sums,
            )  # fmt: skip
            for (a, b, _), (d_a, d_b) in zip(index_pairs, per_pair):
                directions[a], directions[b] = d_a, d_b
            plain = work.memo("plain", None, lambda: _unpaired(len(params), index_pairs))
        plain_directions = []
        for i in plain:
            if directions[i] is not None:  # torch's fused CPU AdamW mis-reads non-contiguous gradients
                directions[i] = directions[i].to(direction_dtype(directions[i].dtype)).contiguous()
                plain_directions.append(directions[i])
        if plain_directions and sums is not None:
            sums.append(torch.nn.utils.get_total_norm(plain_directions))
        return directions

    def _check_pair_shapes(self, gi: int, group: dict) -> None:
        """Raise LoraPairingError naming the pair unless the factors still chain (an engine may have replaced or
        flattened them since the group was made); the scratch space of the group is rebuilt after any change."""
        params, names = group["params"], group["param_names"]
        shapes = [params[i].shape for a, b, _ in group["pairs"] for i in (a, b)]
        if self._pair_shapes.get(gi) == shapes:
            return
        for a, b, blocks in group["pairs"]:
            check_pair(f"{names[a]} / {names[b]}", params[a], params[b], blocks)
        self._workspaces.pop(gi, None)
        self._pair_shapes[gi] = shapes

    def _prepare(self, gi: int, group: dict, sums: list | None) -> _Step:
        grads = self._gradients(group)
        directions = self._directions(gi, group, grads, sums)
        indices = [i for i, g in enumerate(grads) if g is not None]
        return _Step(indices, [group["params"][i] for i in indices], [directions[i] for i in indices])

    def _raise_if_nonfinite(self, sums: list[Tensor], steps: list[_Step]) -> None:
        """Raise NonFiniteGradientError naming the parameters, unless the ``sums`` (of the directions) are finite.

        A non-finite sum may be an overflow of finite values, so it is confirmed element-wise. A non-finite gradient
        always gives a non-finite direction; a finite one gives one too when a Gram matrix is (nearly) singular.
        """
        if bool(torch.stack([s.to(sums[0].device, torch.float32) for s in sums]).isfinite().all()):
            return
        bad = {"gradient": [], "value": [], "direction": []}
        for group, step in zip(self.param_groups, steps):
            for i, p, d in zip(step.indices, step.params, step.directions):
                kind = "direction" if all_finite(p.grad) else "gradient"
                if kind == "gradient" or not all_finite(d):
                    bad[kind].append(group["param_names"][i])
        for group in self.param_groups if bad["direction"] else []:  # a non-finite factor spoils its partner's
            factors = sorted({i for a, b, _ in group["pairs"] for i in (a, b)})
            bad["value"] += [group["param_names"][i] for i in factors if not torch.isfinite(group["params"][i]).all()]
        names = {kind: ", ".join(n[:5]) + (" ..." if len(n) > 5 else "") for kind, n in bad.items()}
        if not any(bad.values()):
            return  # finite values whose sum overflowed
        if bad["gradient"]:
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or nan) in {len(bad['gradient'])} parameter(s): {names['gradient']}; no "
                "parameter was updated (use torch.amp.GradScaler for fp16, or lower the learning rate)"
            )
        if bad["value"]:
            raise NonFiniteGradientError(
                f"non-finite value (inf or nan) inside {len(bad['value'])} LoRA factor(s) (the parameter itself, not "
                f"its gradient): {names['value']}; no parameter was updated (the factor diverged earlier, or was "
                "loaded or set so)"
            )
        raise NonFiniteGradientError(
            f"the preconditioned direction of {len(bad['direction'])} parameter(s) is not finite although the "
            f"gradient is: {names['direction']}; the Gram matrix of the partner factor is singular or "
            "ill-conditioned (raise reg above 0); no parameter was updated"
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._unheld is not None:
            self._warn_unheld_gradients()
        if not self._materialised:
            self._check_materialised()
        sums: list[Tensor] | None = [] if self.check_finite else None
        steps = [self._prepare(gi, group, sums) for gi, group in enumerate(self.param_groups)]
        if sums:
            self._raise_if_nonfinite(sums, steps)  # before any parameter or state changes
        for group, step in zip(self.param_groups, steps):
            if step.params:
                self._apply(group, step)
        return loss

    def _apply(self, group: dict, step: _Step) -> None:  # the base update: each subclass's own
        raise TypeError(f"{type(self).__name__} defines no base update (_apply)")


class ScaledGD(_LoraOptimizer):
    """Scaled (Riemannian preconditioned) gradient descent for LoRA; ``precondition=False`` gives plain SGD.

    ::

        for each LoRA pair (A, B), with A, B before the step:
            d_A = (BᵀB + reg I)⁻¹ ∇A          d_B = ∇B (AAᵀ + reg I)⁻¹       (d = ∇ if not precondition)
        for every other trainable parameter p:  d_p = ∇p
        buf <- momentum buf + d   (buf = d at the first step; skipped when momentum = 0);  d <- buf
        p   <- p (1 - lr weight_decay) - lr d                                 (decoupled weight decay)

    Args:
        params: LoRA pairs (``find_lora_pairs(model)``), ``model.named_parameters()`` (paired by name), or parameter
            groups with ``lora_pairs`` and/or ``params`` (named or not). With ``precondition`` some group must have a
            LoRA pair: an optimizer that would silently be the plain one is an error.
        lr: learning rate. weight_decay: decoupled weight decay. momentum: heavy-ball momentum (0 = none).
        reg: ridge ``reg I`` added to the r x r Gram matrices (>= 0; see core.preconditioner for reg = 0).
        precondition: apply the preconditioner to LoRA pairs.
        check_finite: raise :class:`NonFiniteGradientError` (before changing anything) when a gradient or an update
            direction holds inf or nan.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-2, weight_decay: float = 0.0, momentum: float = 0.0,
        reg: float = 1e-6, precondition: bool = True, check_finite: bool = True,
    ):  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, reg=reg)
        super().__init__(params, defaults, precondition, check_finite)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        _check_nonnegative("momentum", group["momentum"])

    _STATE_COMPLETE = False  # a momentum buffer only with momentum

    def _state_spec(self, p: Tensor) -> dict[str, torch.dtype | None]:
        return {"momentum_buffer": direction_dtype(p.dtype)}

    def _apply(self, group: dict, step: _Step) -> None:
        buffers = [self.state[p].get("momentum_buffer") for p in step.params]
        sgd_update(
            step.params, step.directions, buffers, lr=group["lr"], weight_decay=group["weight_decay"],
            momentum=group["momentum"],
        )  # fmt: skip
        if group["momentum"]:
            for p, buffer in zip(step.params, buffers):
                self.state[p]["momentum_buffer"] = buffer


class ScaledAdamW(_LoraOptimizer):
    """Scaled AdamW: AdamW with the Riemannian preconditioner, in two variants; ``precondition=False`` is AdamW.

    ``variant="gradient"`` (the default, the authors' code): AdamW's moments of the preconditioned gradient::

        for each LoRA pair (A, B), with A, B before the step:
            d_A = (BᵀB + reg I)⁻¹ ∇A          d_B = ∇B (AAᵀ + reg I)⁻¹       (d = ∇ if not precondition)
        for every other trainable parameter p:  d_p = ∇p
        t += 1;   m <- β1 m + (1 - β1) d;   v <- β2 v + (1 - β2) d²
        p <- p (1 - lr weight_decay) - lr m̂ / (sqrt(v̂) + eps)    with m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t)

    ``variant="update"`` (the paper's theorem): AdamW's moments of the raw gradient g, its update preconditioned::

        t += 1;   m <- β1 m + (1 - β1) g;   v <- β2 v + (1 - β2) g²;   u = m̂ / (sqrt(v̂) + eps)
        for each LoRA pair (A, B), with A, B before the step:
            d_A = (BᵀB + reg I)⁻¹ u_A          d_B = u_B (AAᵀ + reg I)⁻¹     (d = u if not precondition)
        for every other trainable parameter p:  d_p = u_p
        p <- p (1 - lr weight_decay) - lr d

    ``bias_correction=False`` takes m̂ = m and v̂ = v (the authors' setting for their Mistral runs). ``p.grad`` is
    never modified; the state of each parameter is torch AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``).

    Args:
        params, reg, precondition, check_finite: as :class:`ScaledGD`.
        lr, betas, eps, weight_decay: as torch.optim.AdamW. bias_correction: AdamW's (True as in torch).
        variant: ``"gradient"`` or ``"update"``, see above.
        fused: use torch's fused AdamW kernel (``None``: where it applies, parameters on CPU or CUDA).
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, reg: float = 1e-6, bias_correction: bool = True, variant: str = "gradient",
        precondition: bool = True, check_finite: bool = True, fused: bool | None = None,
    ):  # fmt: skip
        defaults = dict(
            lr=lr, betas=_as_pair(betas), eps=eps, weight_decay=weight_decay, reg=reg, bias_correction=bias_correction,
            variant=variant, fused=fused,
        )  # fmt: skip
        super().__init__(params, defaults, precondition, check_finite)

    # saved before these existed: the authors' gradient variant, torch's choice of kernel
    _ADDED_HYPERPARAMETERS = {"variant": "gradient", "fused": None}

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        betas = group["betas"] = _as_pair(group["betas"])
        numbers = isinstance(betas, tuple) and all(isinstance(b, (int, float)) and type(b) is not bool for b in betas)
        if not numbers or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        _check_nonnegative("eps", group["eps"])
        if group["variant"] not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {group['variant']!r}")
        if group["fused"] is None:  # settled here, so that load_state_dict puts the step counters where it needs them
            group["fused"] = all(p.device.type in ("cpu", "cuda") for p in group["params"])

    def _state_spec(self, p: Tensor) -> dict[str, torch.dtype | None]:
        return {"step": None, "exp_avg": direction_dtype(p.dtype), "exp_avg_sq": direction_dtype(p.dtype)}

    _TORCH_ONLY = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"}

    def _foreign_group(self, where: str, group: dict, saved: dict) -> dict:
        """A ``torch.optim.AdamW`` group: its per-parameter state is this optimizer's (step, exp_avg, exp_avg_sq),
        so it loads, with its hyperparameters (lr, betas, eps, weight_decay, a scheduler's entries) and the current
        pairing and settings (reg, variant, bias_correction). torch's Adam with weight decay, amsgrad or maximize
        is refused: those are other update rules."""
        if not {"betas", "eps", "amsgrad"} <= set(saved) or "momentum" in saved:
            super()._foreign_group(where, group, saved)
        if not saved.get("decoupled_weight_decay", False) and saved.get("weight_decay", 0):
            raise ValueError(
                f"{where}: the saved state is torch.optim.Adam's with weight_decay={saved['weight_decay']!r}, which "
                "enters the gradient; ScaledAdamW's weight decay is decoupled (AdamW's)"
            )
        for flag in ("amsgrad", "maximize"):
            if saved.get(flag):
                raise ValueError(f"{where}: the saved torch AdamW state has {flag}=True, which ScaledAdamW does not do")
        adopted = {k: v for k, v in saved.items() if k not in self._TORCH_ONLY and k not in ("params", "param_names")}
        return {**{k: v for k, v in group.items() if k != "params"}, **adopted}

    def _prepare(self, gi: int, group: dict, sums: list | None) -> _Step:
        """Directions and, but for torch's own case (the gradient variant with bias correction), the new moments."""
        if group["variant"] == "gradient":
            step = super()._prepare(gi, group, sums)
            if group["bias_correction"] and all(p.dtype != torch.float16 for p in step.params):
                return step  # _apply hands the directions to torch's AdamW (float16 has float32 moments, see below)
            u, m, v = self._normalised(group, step.params, step.directions)
            return step._replace(directions=u, moments=(m, v))  # u of the preconditioned gradients is the update
        grads = self._gradients(group)  # the update variant: u of the gradients is preconditioned
        indices = [i for i, g in enumerate(grads) if g is not None]
        params = [group["params"][i] for i in indices]
        u, m, v = self._normalised(group, params, [grads[i] for i in indices])
        vectors: list[Tensor | None] = [None] * len(grads)
        for i, u_i in zip(indices, u):
            vectors[i] = u_i
        directions = self._directions(gi, group, vectors, sums)
        return _Step(indices, params, [directions[i] for i in indices], (m, v))

    def _normalised(self, group: dict, params: list[Tensor], vectors: list[Tensor]) -> tuple[list[Tensor], ...]:
        """:func:`adam_normalised_step` of ``vectors`` with the state of ``params`` (none yet: a first step)."""
        states = [self.state.get(p, {}) for p in params]
        return adam_normalised_step(
            vectors, [s.get("exp_avg") for s in states], [s.get("exp_avg_sq") for s in states],
            [float(s["step"]) + 1 if s else 1.0 for s in states], beta1=group["betas"][0], beta2=group["betas"][1],
            eps=group["eps"], bias_correction=group["bias_correction"],
        )  # fmt: skip

    def _apply(self, group: dict, step: _Step) -> None:
        states = []
        for p in step.params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                moments = dict(dtype=direction_dtype(p.dtype), memory_format=torch.preserve_format)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p, **moments), torch.zeros_like(p, **moments)
            states.append(state)
        lr, weight_decay = group["lr"], group["weight_decay"]
        if step.moments is None:  # torch's AdamW update, with the directions in place of the gradients
            adamw(
                step.params, step.directions, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                [s["step"] for s in states], foreach=not group["fused"], fused=group["fused"], amsgrad=False,
                beta1=group["betas"][0], beta2=group["betas"][1], lr=lr, weight_decay=weight_decay, eps=group["eps"],
                maximize=False,
            )  # fmt: skip
            return
        for state, m, v in zip(states, *step.moments):
            state["step"] += 1
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        no_momentum = [None] * len(step.params)
        sgd_update(step.params, step.directions, no_momentum, lr=lr, weight_decay=weight_decay, momentum=0.0)
