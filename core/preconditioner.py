"""The Riemannian (scaled) preconditioner as pure functions.

For a LoRA pair ``W + B A`` with A (r x n) and B (m x r) the preconditioned gradients are::

    G_A = (BᵀB + reg I_r)⁻¹ ∇A          G_B = ∇B (AAᵀ + reg I_r)⁻¹

computed from A and B as they are before the step. The r x r Gram matrices are factorised by Cholesky in float32 (or
in the factors' dtype if wider), whatever the parameters' dtype, and the result is returned in float32/wider;
callers cast back.

Singular Gram matrices (``reg = 0`` and a rank-deficient factor, e.g. B = 0 at initialisation): ∇A = Bᵀ ∂L/∂(BA)
always lies in the row space of B, so the system ``BᵀB X = ∇A`` is consistent and its minimum-norm solution
``(BᵀB)⁺ ∇A`` is the limit of the regularised update as reg -> 0. That is what is computed for the matrices whose
Cholesky factorisation fails (through a float64 eigendecomposition; no reg is added behind the user's back); it is the same algorithm, not a fallback to
the identity. At step 0 with B = 0 it gives G_A = 0 (= ∇A), so only B moves, exactly as with reg > 0.
"""

from __future__ import annotations

import torch

__all__ = [
    "precondition_pair", "precondition_stacked", "precondition_A", "precondition_B", "gram_inverse",
    "regularized_gram_inverse", "compute_dtype", "Workspace",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the r x r solves run in: float32, or the parameter dtype when it is wider."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pseudo_inverse_psd(gram: torch.Tensor) -> torch.Tensor:
    """Moore-Penrose inverse of symmetric positive semi-definite ``gram`` (batched), via float64 ``eigh``."""
    evals, evecs = torch.linalg.eigh(gram.double())
    cutoff = evals.amax(dim=-1, keepdim=True).clamp_min(0) * (gram.shape[-1] * torch.finfo(gram.dtype).eps)
    inv_evals = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return ((evecs * inv_evals.unsqueeze(-2)) @ evecs.mT).to(gram.dtype)


def gram_inverse(gram: torch.Tensor, work: Workspace | None = None) -> torch.Tensor:
    """``gram⁻¹`` for a batch (..., r, r) of symmetric positive semi-definite matrices, from their Cholesky factors.

    Matrices whose Cholesky factorisation fails (only semi-definite) get the pseudo-inverse ``gram⁺`` (see the
    module docstring: the minimum-norm solution, the reg -> 0 limit). Forming the r x r inverse from the Cholesky
    factor and applying it with one batched matmul is 2-3x faster than two batched triangular solves against the
    (r x n) right-hand sides on CPU (benchmarks/optimizer_step.py), with the same float32 accuracy here.
    """
    work = work or _NO_REUSE
    chol = work.empty("chol", gram.shape, gram.dtype, gram.device)
    info = work.empty("info", gram.shape[:-2], torch.int32, gram.device)
    torch.linalg.cholesky_ex(gram, out=(chol, info))
    inverse = work.empty("inverse", gram.shape, gram.dtype, gram.device)
    failed = info != 0
    if not failed.any():
        return torch.cholesky_inverse(chol, out=inverse)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    torch.cholesky_inverse(torch.where(failed[..., None, None], eye, chol), out=inverse)
    inverse[failed] = _pseudo_inverse_psd(gram[failed])
    return inverse


class Workspace:
    """Scratch tensors reused from step to step, by name.

    On CPU every large temporary is a fresh ``mmap`` from the C allocator, and touching its pages costs more than the
    arithmetic at LoRA ranks (about 700 page faults per step at GPT-2-medium r=4). The optimizer therefore keeps its
    stacks and products in buffers it reuses; on CUDA the caching allocator already does this, so ``empty`` there
    simply allocates. ``Workspace(reuse=False)`` (the default of the pure functions) always allocates.
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[str, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if not self.reuse or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer


_NO_REUSE = Workspace(reuse=False)


def regularized_gram_inverse(gram: torch.Tensor, reg: float, work: Workspace | None = None) -> torch.Tensor:
    """``(gram + reg I)⁻¹`` for a batch of Gram matrices (``gram`` is modified in place)."""
    if reg:
        gram.diagonal(dim1=-2, dim2=-1).add_(reg)
    return gram_inverse(gram, work)


def precondition_A(
    B: torch.Tensor, grad_A: torch.Tensor, reg: float, work: Workspace = _NO_REUSE, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(BᵀB + reg I)⁻¹ ∇A`` for stacked B (P, m, r) and ∇A (P, r, n) in the compute dtype (into ``out`` if given)."""
    P, m, r = B.shape
    # MKL's batched gemm is about 2x slower on the transposed thin operand than on a copy of Bᵀ
    Bt = work.empty("A.Bt", (P, r, m), B.dtype, B.device).copy_(B.mT)
    gram = torch.bmm(Bt, Bt.mT, out=work.empty("A.gram", (P, r, r), B.dtype, B.device))
    inverse = regularized_gram_inverse(gram, reg, work)
    if out is None:
        out = work.empty("A.out", grad_A.shape, grad_A.dtype, grad_A.device)
    return torch.bmm(inverse, grad_A, out=out)


def precondition_B(
    A: torch.Tensor, grad_B: torch.Tensor, reg: float, work: Workspace = _NO_REUSE, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``∇B (AAᵀ + reg I)⁻¹`` for stacked A (P, r, n) and ∇B (P, m, r) in the compute dtype (into ``out`` if given)."""
    P, r, _ = A.shape
    gram = torch.bmm(A, A.mT, out=work.empty("B.gram", (P, r, r), A.dtype, A.device))
    inverse = regularized_gram_inverse(gram, reg, work)
    # (Gram⁻¹ ∇Bᵀ)ᵀ: the inverse is symmetric, and a left product with the thin (r x m) side is the faster kernel
    transposed = torch.bmm(inverse, grad_B.mT, out=work.empty("B.t", (P, r, grad_B.shape[1]), A.dtype, A.device))
    if out is None:
        out = work.empty("B.out", grad_B.shape, grad_B.dtype, grad_B.device)
    return out.copy_(transposed.mT)


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
