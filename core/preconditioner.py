"""The Riemannian (scaled) preconditioner as pure functions.

For a LoRA pair ``W + B A`` with A (r x n) and B (m x r) the preconditioned gradients are::

    G_A = (BᵀB + reg I_r)⁻¹ ∇A          G_B = ∇B (AAᵀ + reg I_r)⁻¹

computed from A and B as they are before the step. The r x r systems are solved by Cholesky in float32 (or in the
factors' dtype if wider), whatever the parameters' dtype, and the result is returned in float32/wider; callers
cast back.

Singular Gram matrices (``reg = 0`` and a rank-deficient factor, e.g. B = 0 at initialisation): ∇A = Bᵀ ∂L/∂(BA)
always lies in the row space of B, so the system ``BᵀB X = ∇A`` is consistent and its minimum-norm solution
``(BᵀB)⁺ ∇A`` is the limit of the regularised update as reg -> 0. That is what is computed for the matrices whose
Cholesky factorisation fails (through a float64 eigendecomposition); it is the same algorithm, not a fallback to
the identity. At step 0 with B = 0 it gives G_A = 0 (= ∇A), so only B moves, exactly as with reg > 0.
"""

from __future__ import annotations

import torch

__all__ = [
    "precondition_pair", "precondition_stacked", "precondition_A", "precondition_B", "solve_gram", "compute_dtype",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the r x r solves run in: float32, or the parameter dtype when it is wider."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _min_norm_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``gram⁺ rhs`` for symmetric positive semi-definite ``gram`` (batched), via a float64 eigendecomposition."""
    evals, evecs = torch.linalg.eigh(gram.double())
    cutoff = evals.amax(dim=-1, keepdim=True).clamp_min(0) * (gram.shape[-1] * torch.finfo(gram.dtype).eps)
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    solution = evecs @ (inv.unsqueeze(-1) * (evecs.mT @ rhs.double()))
    return solution.to(rhs.dtype)


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, left: bool = True) -> torch.Tensor:
    """Solve ``gram X = rhs`` (``left``) or ``X gram = rhs`` (``not left``) for batched SPD ``gram`` (..., r, r).

    Cholesky where the matrix is positive definite; the minimum-norm solution where it is only semi-definite
    (see the module docstring). ``rhs`` is (..., r, n) when ``left`` and (..., m, r) otherwise.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    if left:
        y = torch.linalg.solve_triangular(chol, rhs, upper=False, left=True)
        x = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=True)
    else:  # X L Lᵀ = rhs
        y = torch.linalg.solve_triangular(chol.mT, rhs, upper=True, left=False)
        x = torch.linalg.solve_triangular(chol, y, upper=False, left=False)
    failed = info != 0
    if failed.any():
        idx = failed.nonzero(as_tuple=True)
        sub_rhs = rhs[idx] if left else rhs[idx].mT
        sub = _min_norm_solve(gram[idx], sub_rhs)
        x[idx] = sub if left else sub.mT
    return x


def precondition_A(B: torch.Tensor, grad_A: torch.Tensor, reg: float) -> torch.Tensor:
    """``(BᵀB + reg I)⁻¹ ∇A`` for stacked B (P, m, r) and ∇A (P, r, n) in the compute dtype."""
    gram = B.mT @ B
    if reg:
        gram.diagonal(dim1=-2, dim2=-1).add_(reg)
    return solve_gram(gram, grad_A, left=True).contiguous()


def precondition_B(A: torch.Tensor, grad_B: torch.Tensor, reg: float) -> torch.Tensor:
    """``∇B (AAᵀ + reg I)⁻¹`` for stacked A (P, r, n) and ∇B (P, m, r) in the compute dtype."""
    gram = A @ A.mT
    if reg:
        gram.diagonal(dim1=-2, dim2=-1).add_(reg)
    return solve_gram(gram, grad_B, left=False).contiguous()


def precondition_stacked(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched preconditioner for P pairs stacked along dim 0.

    A, grad_A: (P, r, n); B, grad_B: (P, m, r), all in the compute dtype. Returns (G_A, G_B).
    """
    return precondition_A(B, grad_A, reg), precondition_B(A, grad_B, reg)


def precondition_pair(
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    reg: float,
    blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preconditioned gradients of one pair, returned with the parameters' shapes in the compute dtype.

    ``A`` may be a conv kernel (r, c, k, k) and ``B`` a 1x1 conv (m, r, 1, 1): they are flattened to matrices.
    With ``blocks`` = k, A is (k r, n) and B is (k m, r) and each block is preconditioned on its own.
    """
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    dtype = compute_dtype(A.dtype)
    r = B.shape[1]
    m = B.shape[0] // blocks
    a = A.detach().reshape(blocks, r, -1).to(dtype)
    b = B.detach().reshape(blocks, m, r).to(dtype)
    ga = grad_A.reshape(blocks, r, -1).to(dtype)
    gb = grad_B.reshape(blocks, m, r).to(dtype)
    G_A, G_B = precondition_stacked(a, b, ga, gb, reg)
    return G_A.reshape(A.shape), G_B.reshape(B.shape)
