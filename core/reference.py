"""A plain, slow reference implementation of scaled GD and scaled AdamW, in float64, one tensor at a time.

It is written to be read against the paper, not to be fast: no stacking, no fused kernels, an explicit
``torch.linalg.solve`` per block (the minimum-norm solution through a pseudo-inverse when the Gram matrix is
singular). The tests run it beside :mod:`core.optimizers` on identical gradients for many steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pairing import LoraPair

__all__ = ["reference_directions", "ReferenceScaledGD", "ReferenceScaledAdamW"]


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """``gram⁻¹ rhs``, or ``gram⁺ rhs`` when ``gram`` is singular (float64)."""
    try:
        torch.linalg.cholesky(gram)  # raises LinAlgError unless gram is positive definite
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(gram, hermitian=True) @ rhs
    return torch.linalg.solve(gram, rhs)


def reference_directions(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor, reg: float, blocks: int = 1):
    """Float64 ``(BᵢᵀBᵢ + reg I)⁻¹ ∇Aᵢ`` and ``∇Bᵢ (AᵢAᵢᵀ + reg I)⁻¹`` for each block i, shaped like A and B."""
    r = B.shape[1]
    m = B.shape[0] // blocks
    a, b = A.double().reshape(blocks * r, -1), B.double().reshape(blocks * m, r)
    ga, gb = grad_A.double().reshape(blocks * r, -1), grad_B.double().reshape(blocks * m, r)
    eye = torch.eye(r, dtype=torch.float64)
    G_A, G_B = torch.empty_like(ga), torch.empty_like(gb)
    for i in range(blocks):
        Ai, Bi = a[i * r : (i + 1) * r], b[i * m : (i + 1) * m]
        G_A[i * r : (i + 1) * r] = _solve(Bi.T @ Bi + reg * eye, ga[i * r : (i + 1) * r])
        G_B[i * m : (i + 1) * m] = _solve(Ai @ Ai.T + reg * eye, gb[i * m : (i + 1) * m].T).T
    return G_A.reshape(A.shape), G_B.reshape(B.shape)


class _Reference:
    """Holds float64 masters of the parameters; ``step()`` reads ``.grad`` and writes the results back."""

    def __init__(self, pairs: list[LoraPair], plain: list[Tensor], reg: float, precondition: bool = True):
        self.pairs, self.plain, self.reg, self.precondition = pairs, plain, reg, precondition
        self.params = [t for p in pairs for t in (p.A, p.B)] + list(plain)
        self.master = {id(p): p.detach().double().clone() for p in self.params}
        self.t = 0

    def directions(self) -> dict[int, Tensor]:
        out = {}
        for pair in self.pairs:
            gA, gB = pair.A.grad.double(), pair.B.grad.double()
            if self.precondition:
                A, B = self.master[id(pair.A)], self.master[id(pair.B)]
                gA, gB = reference_directions(A, B, gA, gB, self.reg, pair.blocks)
            out[id(pair.A)], out[id(pair.B)] = gA, gB
        for p in self.plain:
            out[id(p)] = p.grad.double()
        return out

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        directions = self.directions()
        for p in self.params:
            self.master[id(p)] = self.update(id(p), self.master[id(p)], directions[id(p)])
            p.copy_(self.master[id(p)])


class ReferenceScaledGD(_Reference):
    """``p <- p (1 - lr wd) - lr d`` (no momentum) in float64."""

    def __init__(self, pairs, plain=(), lr=1e-2, weight_decay=0.0, reg=1e-6, precondition=True):
        super().__init__(pairs, list(plain), reg, precondition)
        self.lr, self.weight_decay = lr, weight_decay

    def update(self, key: int, p: Tensor, d: Tensor) -> Tensor:
        return p * (1 - self.lr * self.weight_decay) - self.lr * d


class ReferenceScaledAdamW(_Reference):
    """AdamW (torch's formulation, decoupled weight decay, optional bias correction) on the directions, float64."""

    def __init__(
        self, pairs, plain=(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, reg=1e-6,
        bias_correction=True, precondition=True,
    ):  # fmt: skip
        super().__init__(pairs, list(plain), reg, precondition)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.bias_correction = bias_correction
        self.m: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def update(self, key: int, p: Tensor, d: Tensor) -> Tensor:
        b1, b2 = self.betas
        m = b1 * self.m.get(key, torch.zeros_like(d)) + (1 - b1) * d
        v = b2 * self.v.get(key, torch.zeros_like(d)) + (1 - b2) * d * d
        self.m[key], self.v[key] = m, v
        c1, c2 = (1 - b1**self.t, 1 - b2**self.t) if self.bias_correction else (1.0, 1.0)
        p = p * (1 - self.lr * self.weight_decay)
        return p - (self.lr / c1) * m / (torch.sqrt(v / c2) + self.eps)
