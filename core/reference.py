"""Plain float64 twins of :class:`~core.optimizers.ScaledGD` and :class:`~core.optimizers.ScaledAdamW`.

Written to be read against the paper, not to be fast: one tensor and one merged block at a time, float64 master
copies of the parameters (written back into them after each step), an explicit solve per block (through the
pseudo-inverse when the Gram matrix is singular), the update rules as the docstrings of :mod:`core.optimizers` state
them. A twin takes its fast class's constructor (it inherits its arguments, checks and parameter groups; ``fused``
has no kernel to choose here), so that tests build both alike and run them side by side for many steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .optimizers import NonFiniteGradientError, ScaledAdamW, ScaledGD

__all__ = ["ScaledGDReference", "ScaledAdamWReference", "reference_directions"]


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """``gram⁻¹ rhs``, or ``gram⁺ rhs`` when ``gram`` is singular (float64)."""
    try:
        torch.linalg.cholesky(gram)  # raises LinAlgError unless gram is positive definite
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(gram, hermitian=True) @ rhs
    return torch.linalg.solve(gram, rhs)


def reference_directions(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, reg: float, blocks: int = 1):
    """Float64 ``(BᵢᵀBᵢ + reg I)⁻¹ ∇Aᵢ`` and ``∇Bᵢ (AᵢAᵢᵀ + reg I)⁻¹`` for each block i, shaped like A and B."""
    r, m = B.shape[1], B.shape[0] // blocks
    a, b = A.double().reshape(blocks * r, -1), B.double().reshape(blocks * m, r)
    ga, gb = grad_A.double().reshape(blocks * r, -1), grad_B.double().reshape(blocks * m, r)
    eye = torch.eye(r, dtype=torch.float64)
    d_A, d_B = torch.empty_like(ga), torch.empty_like(gb)
    for i in range(blocks):
        rows_A, rows_B = slice(i * r, (i + 1) * r), slice(i * m, (i + 1) * m)
        A_i, B_i = a[rows_A], b[rows_B]
        d_A[rows_A] = _solve(B_i.T @ B_i + reg * eye, ga[rows_A])
        d_B[rows_B] = _solve(A_i @ A_i.T + reg * eye, gb[rows_B].T).T
    return d_A.reshape(A.shape), d_B.reshape(B.shape)


class _Float64Step:
    """The step both twins share: float64 directions from float64 masters, the rule of the subclass, write-back."""

    def _precondition(self, group: dict, masters: list[Tensor], vectors: list[Tensor | None]) -> list:
        """Preconditioned ``vectors`` (one per parameter of the group) of the LoRA pairs; the others as they are."""
        out = list(vectors)
        for a, b, blocks in group["pairs"] if self.precondition else []:
            zeros_A, zeros_B = torch.zeros_like(masters[a]), torch.zeros_like(masters[b])
            v_a, v_b = (zeros_A if vectors[a] is None else vectors[a]), (zeros_B if vectors[b] is None else vectors[b])
            d_a, d_b = reference_directions(masters[a], masters[b], v_a, v_b, group["reg"], blocks)
            out[a], out[b] = (None if vectors[a] is None else d_a), (None if vectors[b] is None else d_b)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = []
        for group in self.param_groups:
            params = group["params"]
            masters = [self.state[p]["master"] if "master" in self.state[p] else p.double() for p in params]
            grads = [None if p.grad is None else p.grad.double() for p in params]
            new = self._rule(group, params, masters, grads)  # {index: (new master, new state entries)}
            bad = [group["param_names"][i] for i, (master, _) in new.items() if not torch.isfinite(master).all()]
            if bad and self.check_finite:
                raise NonFiniteGradientError(f"non-finite update of {len(bad)} parameter(s): {', '.join(bad)}")
            updates += [(params[i], master, entries) for i, (master, entries) in new.items()]
        for p, master, entries in updates:
            self.state[p].update(entries, master=master)
            p.copy_(master)
        return loss


class ScaledGDReference(_Float64Step, ScaledGD):
    """:class:`~core.optimizers.ScaledGD` in float64, one tensor at a time (same constructor)."""

    def _rule(self, group, params, masters, grads):
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        new = {}
        for i, d in enumerate(self._precondition(group, masters, grads)):
            if d is None:
                continue
            entries = {}
            if momentum:
                previous = self.state[params[i]].get("momentum_buffer")
                d = entries["momentum_buffer"] = d if previous is None else momentum * previous + d
            new[i] = (masters[i] * (1 - lr * wd) - lr * d, entries)
        return new


class ScaledAdamWReference(_Float64Step, ScaledAdamW):
    """:class:`~core.optimizers.ScaledAdamW` in float64, one tensor at a time (same constructor)."""

    def _rule(self, group, params, masters, grads):
        (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
        gradient_variant = group["variant"] == "gradient"
        vectors = self._precondition(group, masters, grads) if gradient_variant else grads
        moments, normalised = {}, [None] * len(params)
        for i, g in enumerate(vectors):
            if g is None:
                continue
            state = self.state[params[i]]
            t = state.get("step", 0) + 1
            m = b1 * state.get("exp_avg", torch.zeros_like(g)) + (1 - b1) * g
            v = b2 * state.get("exp_avg_sq", torch.zeros_like(g)) + (1 - b2) * g * g
            c1, c2 = (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)
            normalised[i] = (m / c1) / (torch.sqrt(v / c2) + eps)
            moments[i] = {"step": t, "exp_avg": m, "exp_avg_sq": v}
        directions = normalised if gradient_variant else self._precondition(group, masters, normalised)
        return {i: (masters[i] * (1 - lr * wd) - lr * directions[i], moments[i]) for i in moments}
