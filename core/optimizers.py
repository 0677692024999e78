"""Scaled GD and scaled AdamW for LoRA: a preconditioning transformation followed by the base update.

Both optimizers share :class:`LoraOptimizer`, which turns gradients into *update directions*: for each LoRA pair
the Riemannian preconditioner of :mod:`core.preconditioner` (``precondition=True``) or the identity
(``precondition=False``, i.e. plain SGD / AdamW through exactly the same code), and the identity for every other
trainable parameter. The subclasses only implement the base update (:func:`sgd_update`, :func:`adamw_update`).

Parameter groups take the usual torch keys plus ``lora_pairs``: a list of :class:`core.pairing.LoraPair` or of
``(A, B)`` / ``(A, B, blocks)`` tuples. Internally a group stores its pairs as ``pairs = [[index_A, index_B,
blocks], ...]`` into its ``params`` list, so ``state_dict()`` / ``load_state_dict()`` work unchanged.

Fast path: pairs are bucketed by shape, blocks, dtype and device. Small factors (at most ``STACK_MAX_NUMEL``
elements, e.g. r = 4) are stacked so that a bucket's Gram matrices, Cholesky factorisations, r x r inverses and
their application are single batched calls; larger factors get one product each (already efficient, and nothing
is copied), with the r x r work still batched. Scratch tensors are reused from step to step on CPU
(:class:`core.preconditioner.Workspace`), the AdamW update is torch's fused kernel over all parameters of a group
(foreach kernels where the fused one does not apply), and its per-parameter step counters are views of one tensor.
:mod:`core.reference` holds a plain float64 per-pair implementation that the tests run beside this one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .pairing import LoraPair, check_pair
from .preconditioner import Workspace, compute_dtype, precondition_A, precondition_B, regularized_gram_inverse

__all__ = ["LoraOptimizer", "ScaledGD", "ScaledAdamW", "sgd_update", "adamw_update", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient (or the update direction made from a finite one) holds inf or NaN; raised before any change."""


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


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
    step_buffer: Tensor | None = None,
) -> None:
    """torch.optim.AdamW's update with ``directions`` in place of gradients (all tensors one device and dtype).

    ``step_buffer``: when the ``steps`` are 0-dim views of this one tensor, a single add advances them all.
    ``fused`` uses torch's fused AdamW kernel (bias correction only); otherwise foreach kernels compute::

        t += 1;  p *= 1 - lr wd;  m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d²
        p -= lr / c1 * m / (sqrt(v) / sqrt(c2) + eps)   with c_i = 1 - b_i^t, or c_i = 1 without bias correction
    """
    if step_buffer is not None:
        step_buffer.add_(1)
    else:
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
        self._plan_cache: dict[int, _Plan] = {}
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
        self._plan_cache.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plan_cache.clear()

    def _validate_group(self, group: dict) -> None:
        _check_nonnegative("lr", group["lr"])
        _check_nonnegative("weight_decay", group["weight_decay"])
        _check_nonnegative("reg", group["reg"])

    # -- preconditioning ---------------------------------------------------------------------------------------
    def _plan(self, gi: int, group: dict) -> _Plan:
        """Which parameters have gradients and how their directions are computed; rebuilt when that set changes."""
        params = group["params"]
        mask = tuple(p.grad is not None for p in params)
        plan = self._plan_cache.get(gi)
        if plan is not None and plan.mask == mask:
            return plan
        indices = [i for i, has_grad in enumerate(mask) if has_grad]
        position = {i: k for k, i in enumerate(indices)}
        buckets = []
        if self.precondition:
            for side, blocks, members in _bucket_members(group):
                members = [(i, j) for i, j in members if mask[i]]
                if members:
                    buckets.append(_Bucket(side, blocks, members, [position[i] for i, _ in members], params))
        covered = {k for bucket in buckets for k in bucket.positions}
        plan = _Plan(mask, indices, buckets, [k for k in range(len(indices)) if k not in covered])
        self._plan_cache[gi] = plan
        return plan

    def _directions(self, gi: int, group: dict, finite_checks: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(params, directions) of the group's parameters that have a gradient.

        Appends to ``finite_checks`` scalars that are all finite when every direction is (see _raise_if_nonfinite).
        """
        params = group["params"]
        plan = self._plan(gi, group)
        directions = [params[i].grad for i in plan.indices]
        if any(d.layout != torch.strided for d in directions):
            name = next(group["param_names"][i] for i in plan.indices if params[i].grad.layout != torch.strided)
            raise ValueError(f"sparse gradients are not supported (parameter '{name}')")
        checks = finite_checks if self.check_finite else None
        for bucket in plan.buckets:
            for k, d in zip(bucket.positions, bucket.directions(params, group["reg"], checks)):
                directions[k] = d
        plain = []
        for k in plan.plain:
            d = directions[k]
            if not d.is_contiguous():  # the fused CPU AdamW kernel mis-reads non-contiguous gradients
                directions[k] = d = d.contiguous()
            plain.append(d)
        if plain and checks is not None:
            checks.extend(torch._foreach_norm(plain))
        return [params[i] for i in plan.indices], directions

    def _raise_if_nonfinite(self, checks: list[Tensor], work: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """Raise NonFiniteGradientError, naming the parameters, if an update direction holds inf or nan.

        ``checks`` are sums and norms of the directions: finite values prove every direction finite. A non-finite
        one may also be an overflow of finite values, so that case is confirmed element-wise before raising. A
        non-finite gradient always gives a non-finite direction (inf or nan times the positive diagonal of an
        inverse Gram matrix); a finite gradient can give one too, when a Gram matrix is singular or nearly so.
        """
        if not checks:
            return
        device, dtype = checks[0].device, checks[0].dtype
        if any(c.device != device or c.dtype != dtype for c in checks):
            checks = [c.to(device=device, dtype=torch.float32) for c in checks]
        if bool(torch.stack(checks).isfinite().all()):
            return
        bad_grads, bad_directions = [], []
        for gi, (group, (params, directions)) in enumerate(zip(self.param_groups, work)):
            names = [group["param_names"][i] for i in self._plan_cache[gi].indices]
            for p, d, name in zip(params, directions, names):
                if not bool(torch.isfinite(p.grad).all()):
                    bad_grads.append(name)
                elif not bool(torch.isfinite(d).all()):
                    bad_directions.append(name)
        if bad_grads:
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or nan) in {len(bad_grads)} parameter(s): {_names(bad_grads)}"
                "; no parameter was updated (use torch.amp.GradScaler for fp16, or lower the learning rate)"
            )
        if bad_directions:
            raise NonFiniteGradientError(
                f"the preconditioned direction of {len(bad_directions)} parameter(s) is not finite although the "
                f"gradient is: {_names(bad_directions)}; the Gram matrix of the partner factor is singular or "
                "ill-conditioned (raise reg above 0); no parameter was updated"
            )

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        checks: list[Tensor] = []
        work = [self._directions(gi, group, checks) for gi, group in enumerate(self.param_groups)]
        if self.check_finite:
            self._raise_if_nonfinite(checks, work)  # before any parameter changes
        for gi, (group, (params, directions)) in enumerate(zip(self.param_groups, work)):
            if params:
                self._update(group, params, directions, self._plan_cache[gi])
        return loss

    def _update(self, group: dict, params: list[Tensor], directions: list[Tensor], plan: _Plan) -> None:
        raise TypeError(f"{type(self).__name__} must implement _update")  # pragma: no cover


def _bucket_members(group: dict) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """One group's factors by side and shape: (side, blocks, [(factor index, partner index), ...]).

    Side "A" means the factor is an A (its direction uses the partner B's Gram matrix), "B" the converse.
    Factors of one entry share shapes, blocks, dtype and device, so they stack.
    """
    params = group["params"]
    buckets: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for ia, ib, blocks in group["pairs"]:
        A, B = params[ia], params[ib]
        key = (A.shape, B.shape, blocks, A.dtype, A.device)
        buckets[("A",) + key].append((ia, ib))
        buckets[("B",) + key].append((ib, ia))
    return [(key[0], key[3], members) for key, members in buckets.items()]


# Factors with at most this many elements are stacked per bucket (one batched product for all); larger ones get one
# product each, which is already efficient and copies nothing (benchmarks/optimizer_step.py measured the crossover).
STACK_MAX_NUMEL = 1 << 15


class _Plan:
    """A group's step plan: ``indices`` of the parameters with gradients, the buckets of LoRA factors among them
    (with their ``positions`` in ``indices``), and the ``plain`` positions whose direction is the gradient."""

    __slots__ = ("mask", "indices", "buckets", "plain", "step_counters", "_subsets")

    def __init__(self, mask: tuple, indices: list[int], buckets: list[_Bucket], plain: list[int]):
        self.mask, self.indices, self.buckets, self.plain = mask, indices, buckets, plain
        self.step_counters: dict[tuple, tuple[Tensor, list[Tensor]]] = {}  # see _step_buffer
        self._subsets: tuple | None = None

    def by_device_and_dtype(self, params: list[Tensor]) -> dict[tuple, list[int]]:
        """Positions of ``params`` grouped by (device, dtype); recomputed when the first one moves or changes dtype."""
        key = (params[0].device, params[0].dtype)
        if self._subsets is None or self._subsets[0] != key:
            subsets = defaultdict(list)
            for k, p in enumerate(params):
                subsets[(p.device, p.dtype)].append(k)
            self._subsets = (key, dict(subsets))
        return self._subsets[1]


class _Bucket:
    """LoRA factors of one side whose pairs share shapes, blocks, dtype and device.

    ``directions`` computes their preconditioned gradients: side "A" gives ``(BᵀB + reg I)⁻¹ ∇A`` (partner B),
    side "B" gives ``∇B (AAᵀ + reg I)⁻¹`` (partner A), each merged block with its own r x r matrix. The results
    are views of one ``out`` tensor (count, *factor shape), whose sum is the bucket's finiteness check.
    """

    __slots__ = ("side", "blocks", "factors", "partners", "positions", "stacked", "work", "r", "shapes", "views")

    def __init__(self, side: str, blocks: int, members: list[tuple[int, int]], positions: list[int], params):
        self.side, self.blocks, self.positions = side, blocks, positions
        self.factors = [i for i, _ in members]
        self.partners = [j for _, j in members]
        factor, partner = params[self.factors[0]], params[self.partners[0]]
        self.stacked = factor.numel() <= STACK_MAX_NUMEL
        self.work = Workspace()  # the bucket's scratch buffers, reused from step to step (see Workspace)
        # each block of the partner and of the gradient as a matrix: (m, r) and (r, n) on side A, (r, n), (m, r) on B
        k = blocks
        r = self.r = partner.shape[1] if side == "A" else factor.shape[1]
        wide, tall = (k, r, factor.numel() // (k * r)), (k, partner.numel() // (k * r), r)
        if side == "B":
            wide, tall = (k, r, partner.numel() // (k * r)), (k, factor.numel() // (k * r), r)
        partner_shape, grad_shape = (tall, wide) if side == "A" else (wide, tall)
        if k == 1:  # plain 2-D products: MKL's batched path is slower for a single thin matrix
            partner_shape, grad_shape = partner_shape[1:], grad_shape[1:]
        self.shapes = {"partner": partner_shape, "grad": grad_shape, "gram": (k, r, r) if k > 1 else (r, r)}
        self.views: dict[str, tuple[Tensor, tuple[Tensor, ...]]] = {}

    def directions(self, params, reg: float, sums: list | None) -> Sequence[Tensor]:
        """The factors' directions, in order; appends the sum of all of them to ``sums`` (the finiteness check)."""
        factor, partner = params[self.factors[0]], params[self.partners[0]]
        dtype = compute_dtype(factor.dtype)
        k, count, r, shapes = self.blocks, len(self.factors), self.r, self.shapes
        work, device = self.work, factor.device
        grads = [params[i].grad for i in self.factors]
        out = work.empty("out", (count, *factor.shape), factor.dtype, device)
        if self.stacked:
            grad = torch.stack(grads, out=work.empty("grads", out.shape, factor.dtype, device))
            partners = work.empty("partners", (count, *partner.shape), partner.dtype, device)
            partners = torch.stack([params[j] for j in self.partners], out=partners)
            partners = partners.to(dtype).reshape(count * k, *shapes["partner"][-2:])
            grad = grad.to(dtype).reshape(count * k, *shapes["grad"][-2:])
            precondition = precondition_A if self.side == "A" else precondition_B
            if factor.dtype == dtype:
                precondition(partners, grad, reg, work, out=out.view(grad.shape))
            else:
                out.view(grad.shape).copy_(precondition(partners, grad, reg, work))
        else:
            grams = work.empty("grams", (count * k, r, r), dtype, device)
            for gram, j in zip(self._per_pair("grams", grams, shapes["gram"]), self.partners):
                p = params[j].to(dtype).reshape(shapes["partner"])
                left, right = (p.mT, p) if self.side == "A" else (p, p.mT)
                torch.matmul(left, right, out=gram)
            inverse = self._per_pair("inverse", regularized_gram_inverse(grams, reg, work), shapes["gram"])
            for target, inv, g in zip(self._per_pair("out", out, shapes["grad"]), inverse, grads):
                g = g.to(dtype).reshape(shapes["grad"])
                left, right = (inv, g) if self.side == "A" else (g, inv)
                if target.dtype == dtype:
                    torch.matmul(left, right, out=target)
                else:
                    target.copy_(left @ right)
        if sums is not None:
            sums.append(out.sum())
        return self._per_pair("directions", out, factor.shape)

    def _per_pair(self, name: str, buffer: Tensor, shape: tuple) -> tuple[Tensor, ...]:
        """``buffer`` (count * ..., contiguous) as one view of ``shape`` per pair. The views are kept while the buffer
        is the same reused CPU tensor: making 48 of them costs 20 us, a tenth of the r = 4 preconditioner."""
        cached = self.views.get(name)
        if cached is not None and cached[0] is buffer:
            return cached[1]
        views = buffer.view(len(self.factors), *shape).unbind(0)
        if self.work.reuse and buffer.device.type == "cpu":
            self.views[name] = (buffer, views)
        return views


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
            :class:`NonFiniteGradientError` (before changing anything) when a gradient or an update direction
            holds inf or nan.
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

    def _update(self, group: dict, params: list[Tensor], directions: list[Tensor], plan: _Plan) -> None:
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
        check_finite: raise :class:`NonFiniteGradientError` (before changing anything) on an inf/nan gradient or
            update direction.
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

    def _update(self, group: dict, params: list[Tensor], directions: list[Tensor], plan: _Plan) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for (device, _), ks in plan.by_device_and_dtype(params).items():
            fused = self.fused if self.fused is not None else device.type in ("cpu", "cuda")
            sub = [states[k] for k in ks]
            # torch's fused kernel wants its step counters on the parameters' device; the foreach path keeps them on CPU
            step_buffer = _step_buffer(plan, (device, fused), sub, device if fused else torch.device("cpu"))
            adamw_update(
                [params[k] for k in ks], [directions[k] for k in ks],
                [s["exp_avg"] for s in sub], [s["exp_avg_sq"] for s in sub], [s["step"] for s in sub],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"], fused=fused, step_buffer=step_buffer,
            )  # fmt: skip


def _step_buffer(plan: _Plan, key: tuple, states: list[dict], device: torch.device) -> Tensor:
    """One tensor on ``device`` whose 0-dim views are these states' ``step`` counters: one add advances them all.

    torch keeps one step tensor per parameter and advances them with a foreach add, which on CPU costs a kernel
    call each (0.13 ms for 96 LoRA factors: a tenth of a scaled AdamW step at r=4). Here the counters are re-made,
    with their values, as views of one buffer the first time a plan meets them (and again after
    ``load_state_dict``); the state keeps torch AdamW's layout, a 0-dim float32 ``step`` per parameter.
    """
    cached = plan.step_counters.get(key)
    if cached is not None and len(cached[1]) == len(states) and all(s["step"] is v for s, v in zip(states, cached[1])):
        return cached[0]
    buffer = torch.stack([s["step"].to(device=device, dtype=torch.float32) for s in states])
    views = list(buffer.unbind(0))
    for state, view in zip(states, views):
        state["step"] = view
    plan.step_counters[key] = (buffer, views)
    return buffer
