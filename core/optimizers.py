"""Scaled GD and scaled AdamW for LoRA: a preconditioning transformation followed by the base update.

Both optimizers share :class:`LoraOptimizer`, which turns gradients into *update directions*: for each LoRA pair
the Riemannian preconditioner of :mod:`core.preconditioner` (``precondition=True``) or the identity
(``precondition=False``, i.e. plain SGD / AdamW through exactly the same code), and the identity for every other
trainable parameter. The subclasses only implement the base update (:func:`sgd_update`, :func:`adamw_update`).

Parameter groups take the usual torch keys plus ``lora_pairs``: a list of :class:`core.pairing.LoraPair` or of
``(A, B)`` / ``(A, B, blocks)`` tuples. Internally a group stores its pairs as ``pairs = [[index_A, index_B,
blocks], ...]`` into its ``params`` list, so ``state_dict()`` / ``load_state_dict()`` work unchanged.

Fast path: pairs are bucketed by shape, dtype and device; each bucket is stacked once, its Gram matrices, Cholesky
factorisations and triangular solves are single batched calls, and the AdamW update is torch's fused kernel over
all parameters of a group (foreach kernels where the fused one does not apply). :mod:`core.reference` holds a
plain float64 per-pair implementation that the tests run beside this one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .pairing import LoraPair, check_pair
from .preconditioner import compute_dtype, precondition_A, precondition_B

__all__ = ["LoraOptimizer", "ScaledGD", "ScaledAdamW", "sgd_update", "adamw_update", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds inf or NaN; raised before any parameter is changed."""


def _check_nonnegative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Base updates (pure functions over lists of tensors)
# --------------------------------------------------------------------------------------------------------------


def sgd_update(
    params: list[Tensor],
    directions: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
) -> list[Tensor | None]:
    """``p <- p (1 - lr wd) - lr d`` with heavy-ball momentum ``buf <- momentum buf + d`` (``d`` on the first step).

    Returns the momentum buffers (new ones created where ``None``).
    """
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if momentum:
        fresh = [i for i, b in enumerate(momentum_buffers) if b is None]
        old = [i for i, b in enumerate(momentum_buffers) if b is not None]
        if old:
            bufs = [momentum_buffers[i] for i in old]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [directions[i] for i in old])
        for i in fresh:
            momentum_buffers[i] = directions[i].clone()
        directions = momentum_buffers
    torch._foreach_add_(params, directions, alpha=-lr)
    return momentum_buffers


def adamw_update(
    params: list[Tensor],
    directions: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    fused: bool = True,
) -> None:
    """torch.optim.AdamW's update with ``directions`` in place of gradients (all tensors one device and dtype).

    ``fused`` uses torch's fused AdamW kernel (bias correction only); otherwise foreach kernels compute::

        t += 1;  p *= 1 - lr wd;  m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d²
        p -= lr / c1 * m / (sqrt(v) / sqrt(c2) + eps)   with c_i = 1 - b_i^t, or c_i = 1 without bias correction
    """
    torch._foreach_add_(steps, 1)
    if fused and bias_correction:
        torch._fused_adamw_(
            params, directions, exp_avgs, exp_avg_sqs, [], steps,
            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
        return
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, directions, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, directions, directions, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if bias_correction:
        t = [float(s) for s in steps]
        torch._foreach_div_(denom, [(1.0 - beta2**ti) ** 0.5 for ti in t])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**ti) for ti in t])
    else:
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


# --------------------------------------------------------------------------------------------------------------
# The shared optimizer
# --------------------------------------------------------------------------------------------------------------


def _normalize_group(group: dict) -> dict:
    """Turn a user group with ``lora_pairs`` into ``params`` + ``pairs`` (index triples) + ``param_names``."""
    group = dict(group)
    plain = group.pop("params", [])
    plain = [plain] if isinstance(plain, Tensor) else list(plain)
    plain_names = group.pop("param_names", None)
    lora_pairs = group.pop("lora_pairs", [])
    if plain_names is not None and len(plain_names) != len(plain):
        raise ValueError(f"param_names has {len(plain_names)} entries for {len(plain)} params")
    if "pairs" in group:  # already normalised (a group handed back to add_param_group)
        if lora_pairs:
            raise ValueError("a parameter group may give 'pairs' (indices) or 'lora_pairs', not both")
        group["params"], group["param_names"] = plain, plain_names or [f"param{i}" for i in range(len(plain))]
        return group

    params: list[Tensor] = []
    names: list[str] = []
    index_pairs: list[list[int]] = []
    for i, pair in enumerate(lora_pairs):
        if isinstance(pair, LoraPair):
            A, B, blocks, a_name, b_name = pair.A, pair.B, pair.blocks, pair.a_name, pair.b_name
        elif isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
            A, B, blocks = pair[0], pair[1], (pair[2] if len(pair) == 3 else 1)
            a_name, b_name = f"lora_pairs.{i}.A", f"lora_pairs.{i}.B"
        else:
            raise TypeError(f"lora_pairs entries must be LoraPair or (A, B[, blocks]) tuples, got {type(pair)}")
        check_pair(a_name.rsplit(".", 1)[0], A, B, blocks)
        index_pairs.append([len(params), len(params) + 1, int(blocks)])
        params += [A, B]
        names += [a_name, b_name]
    names += plain_names if plain_names is not None else [f"param{len(params) + i}" for i in range(len(plain))]
    params += plain
    if len(set(params)) != len(params):
        raise ValueError("a parameter appears twice in one group (as a LoRA factor and as a plain parameter?)")
    group.update(params=params, pairs=index_pairs, param_names=names)
    return group


class LoraOptimizer(torch.optim.Optimizer):
    """Base class: preconditions LoRA-pair gradients (or not) and hands directions to :meth:`_update`."""

    def __init__(self, params: Iterable, defaults: dict, precondition: bool, check_finite: bool):
        self.precondition = precondition
        self.check_finite = check_finite
        self._bucket_cache: dict[int, list] = {}
        params = list(params)
        if params and all(isinstance(p, LoraPair) for p in params):
            params = [{"lora_pairs": params}]
        super().__init__(params, defaults)

    # -- groups ------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(_normalize_group(param_group))
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._bucket_cache.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._bucket_cache.clear()

    def _validate_group(self, group: dict) -> None:
        _check_nonnegative("lr", group["lr"])
        _check_nonnegative("weight_decay", group["weight_decay"])
        _check_nonnegative("reg", group["reg"])

    # -- preconditioning ---------------------------------------------------------------------------------------
    def _buckets(self, gi: int, group: dict) -> list[tuple[str, int, list[tuple[int, int]]]]:
        """Static bucketing of one group's factors: (side, blocks, [(factor index, partner index), ...]).

        Side "A" means the factor is an A (its direction uses the partner B's Gram matrix), "B" the converse.
        Factors of a bucket share shapes, blocks, dtype and device, so they stack.
        """
        if gi in self._bucket_cache:
            return self._bucket_cache[gi]
        params = group["params"]
        buckets: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for ia, ib, blocks in group["pairs"]:
            A, B = params[ia], params[ib]
            key = (A.shape, B.shape, blocks, A.dtype, A.device)
            buckets[("A",) + key].append((ia, ib))
            buckets[("B",) + key].append((ib, ia))
        out = [(key[0], key[3], members) for key, members in buckets.items()]
        self._bucket_cache[gi] = out
        return out

    def _directions(self, gi: int, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """(params, directions) of the group's parameters that have a gradient."""
        params = group["params"]
        directions: dict[int, Tensor] = {}
        if self.precondition and group["pairs"]:
            reg = group["reg"]
            for side, blocks, members in self._buckets(gi, group):
                members = [(i, j) for i, j in members if params[i].grad is not None]
                if not members:
                    continue
                factor0, partner0 = params[members[0][0]], params[members[0][1]]
                dtype = compute_dtype(factor0.dtype)
                if side == "A":  # G_A = (BᵀB + reg I)⁻¹ ∇A, per block
                    m, r = partner0.shape[0] // blocks, partner0.shape[1]
                    partner_shape, grad_shape = (blocks, m, r), (blocks, r, -1)
                else:  # G_B = ∇B (AAᵀ + reg I)⁻¹, per block
                    r = factor0.shape[1]
                    partner_shape, grad_shape = (blocks, r, -1), (blocks, -1, r)
                partners = _stack([params[j].reshape(partner_shape) for _, j in members], dtype)
                grads = _stack([params[i].grad.reshape(grad_shape) for i, _ in members], dtype)
                partners = partners.flatten(0, 1)
                grads = grads.flatten(0, 1)
                precondition = precondition_A if side == "A" else precondition_B
                G = precondition(partners, grads, reg)
                G = G.to(factor0.dtype).reshape(len(members), *factor0.shape)
                for (i, _), g in zip(members, G.unbind(0)):
                    directions[i] = g
        indices = [i for i, p in enumerate(params) if p.grad is not None]
        out = []
        for i in indices:
            d = directions.get(i)
            if d is None:
                d = params[i].grad
                if d.is_sparse:
                    raise ValueError(f"sparse gradients are not supported (parameter '{group['param_names'][i]}')")
                if not d.is_contiguous():  # the fused CPU AdamW kernel mis-reads non-contiguous gradients
                    d = d.contiguous()
            out.append(d)
        return [params[i] for i in indices], out

    def _raise_if_nonfinite(self) -> None:
        grads, names = [], []
        for group in self.param_groups:
            for p, name in zip(group["params"], group["param_names"]):
                if p.grad is not None:
                    grads.append(p.grad)
                    names.append(name)
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        if bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all()):
            return
        bad = [n for n, g in zip(names, norms) if not torch.isfinite(g)]
        raise NonFiniteGradientError(
            f"non-finite gradient (inf or nan) in {len(bad)} parameter(s): {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + "; no parameter was updated (use torch.amp.GradScaler for fp16, or lower the learning rate)"
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite:
            self._raise_if_nonfinite()
        work = [self._directions(gi, group) for gi, group in enumerate(self.param_groups)]
        for group, (params, directions) in zip(self.param_groups, work):
            if params:
                self._update(group, params, directions)
        return loss

    def _update(self, group: dict, params: list[Tensor], directions: list[Tensor]) -> None:
        raise TypeError(f"{type(self).__name__} must implement _update")  # pragma: no cover


def _stack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    stacked = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
    return stacked.to(dtype)


class ScaledGD(LoraOptimizer):
    """Scaled (Riemannian preconditioned) gradient descent for LoRA; ``precondition=False`` gives plain SGD.

    ::

        for each LoRA pair (A, B), with A, B before the step:
            d_A = (BᵀB + reg I)⁻¹ ∇A          d_B = ∇B (AAᵀ + reg I)⁻¹       (identity if not precondition)
        for every other trainable parameter p:  d_p = ∇p
        buf = momentum buf + d   (buf = d at the first step; skipped when momentum = 0);  d = buf
        p  <- p (1 - lr weight_decay) - lr d                                  (decoupled weight decay)

    Args:
        params: LoRA pairs (``find_lora_pairs(model)``) or parameter groups with ``lora_pairs`` and/or ``params``.
        lr: learning rate. weight_decay: decoupled weight decay. momentum: heavy-ball momentum (0 = none).
        reg: ridge ``reg I`` added to the r x r Gram matrices (>= 0; see core.preconditioner for reg = 0).
        precondition: apply the preconditioner to LoRA pairs. check_finite: raise
            :class:`NonFiniteGradientError` (before changing anything) when a gradient holds inf or nan.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        reg: float = 1e-6,
        precondition: bool = True,
        check_finite: bool = True,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, reg=reg)
        super().__init__(params, defaults, precondition, check_finite)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _check_nonnegative("momentum", group["momentum"])

    def _update(self, group: dict, params: list[Tensor], directions: list[Tensor]) -> None:
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        buffers = sgd_update(
            params, directions, buffers, lr=group["lr"], weight_decay=group["weight_decay"],
            momentum=group["momentum"],
        )  # fmt: skip
        if group["momentum"]:
            for p, b in zip(params, buffers):
                self.state[p]["momentum_buffer"] = b


class ScaledAdamW(LoraOptimizer):
    """Scaled AdamW: torch.optim.AdamW fed with the preconditioned directions; ``precondition=False`` is AdamW.

    ::

        for each LoRA pair (A, B), with A, B before the step:
            d_A = (BᵀB + reg I)⁻¹ ∇A          d_B = ∇B (AAᵀ + reg I)⁻¹       (identity if not precondition)
        for every other trainable parameter p:  d_p = ∇p
        t += 1;  p <- p (1 - lr weight_decay)
        m <- β1 m + (1 - β1) d;   v <- β2 v + (1 - β2) d²
        p <- p - lr / (1 - β1^t) · m / (sqrt(v / (1 - β2^t)) + eps)
        (bias_correction=False drops both (1 - β^t) factors: the authors' variant for the Mistral runs)

    ``p.grad`` is never modified. State per parameter is torch AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``).

    Args:
        params: LoRA pairs (``find_lora_pairs(model)``) or parameter groups with ``lora_pairs`` and/or ``params``.
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        reg: ridge ``reg I`` added to the r x r Gram matrices (>= 0; see core.preconditioner for reg = 0).
        bias_correction: AdamW's bias correction (True as in torch).
        precondition: apply the preconditioner to LoRA pairs.
        check_finite: raise :class:`NonFiniteGradientError` (before changing anything) on inf/nan gradients.
        fused: use torch's fused AdamW kernel (default: where it applies: CPU/CUDA, bias correction on).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        reg: float = 1e-6,
        bias_correction: bool = True,
        precondition: bool = True,
        check_finite: bool = True,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, reg=reg, bias_correction=bias_correction
        )
        self.fused = fused
        super().__init__(params, defaults, precondition, check_finite)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        betas = group["betas"]
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        _check_nonnegative("eps", group["eps"])

    def _update(self, group: dict, params: list[Tensor], directions: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        by_device_dtype: dict[tuple, list[int]] = defaultdict(list)
        for k, p in enumerate(params):
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            by_device_dtype[(p.device, p.dtype)].append(k)
        for (device, _), ks in by_device_dtype.items():
            fused = self.fused if self.fused is not None else device.type in ("cpu", "cuda")
            states = [self.state[params[k]] for k in ks]
            for state in states:  # the fused kernel wants its step counters on the parameters' device
                if fused and state["step"].device != device:
                    state["step"] = state["step"].to(device)
            adamw_update(
                [params[k] for k in ks], [directions[k] for k in ks],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"], fused=fused,
            )  # fmt: skip
