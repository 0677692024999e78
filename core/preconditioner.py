"""The Riemannian (scaled) preconditioner: update directions of LoRA factors from their gradients.

For a LoRA pair ``W + B A`` with A (r x n) and B (m x r) the preconditioned gradients are::

    d_A = (BᵀB + reg I_r)⁻¹ ∇A          d_B = ∇B (AAᵀ + reg I_r)⁻¹

computed from A and B as they are before the step, for each merged block on its own (see :mod:`core.pairing`),
convolution factors flattened to matrices. The r x r Gram matrices are factorised by Cholesky in float32 (float64
for float64 factors) whatever the factors' dtype; the directions come back in the factors' dtype.

Singular Gram matrices (``reg = 0`` and a rank-deficient factor, e.g. B = 0 at PEFT's initialisation): ∇A =
Bᵀ ∂L/∂(BA) lies in the row space of B, so ``BᵀB X = ∇A`` is consistent and its minimum-norm solution ``(BᵀB)⁺ ∇A``
is the reg -> 0 limit of the regularised direction. It is computed (through a float64 eigendecomposition, no reg
added) for every Gram matrix whose Cholesky factorisation fails. At step 0 with B = 0 it gives d_A = 0 (= ∇A).
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._workspace import Workspace

__all__ = ["preconditioned_directions", "inverse_gram", "compute_dtype"]

Pair = tuple[Tensor, Tensor, int]  # (A, B, blocks)
Grads = tuple[Optional[Tensor], Optional[Tensor]]  # (∇A, ∇B), None where a factor has no gradient
# Batched path: factors of at most this many elements are stacked (one product per bucket), larger ones get a
# product each, which copies nothing (benchmarks/optimizer_step.py has cases on both sides).
STACK_MAX_NUMEL = 1 << 15


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the r x r systems are solved in: float64 for float64 factors, float32 for all others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_gram(gram: Tensor, reg: float, workspace: Workspace | None = None) -> Tensor:
    """``(gram + reg I)⁻¹`` for a batch (..., r, r) of symmetric positive semi-definite matrices (``gram`` gets the
    ``reg I`` added in place), from their Cholesky factors; ``(gram + reg I)⁺`` for those whose factorisation fails.
    """
    work = workspace or Workspace(reuse=False)
    if reg:
        gram.diagonal(dim1=-2, dim2=-1).add_(reg)
    chol = work.empty("chol", gram.shape, gram.dtype, gram.device)
    info = work.empty("info", gram.shape[:-2], torch.int32, gram.device)
    torch.linalg.cholesky_ex(gram, out=(chol, info))
    inverse = work.empty("inverse", gram.shape, gram.dtype, gram.device)
    if not info.any():
        return torch.cholesky_inverse(chol, out=inverse)
    failed = info != 0
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    torch.cholesky_inverse(torch.where(failed[..., None, None], eye, chol), out=inverse)
    evals, evecs = torch.linalg.eigh(gram[failed].double())  # the Moore-Penrose inverse of the singular ones
    cutoff = evals.amax(dim=-1, keepdim=True).clamp_min(0) * (gram.shape[-1] * torch.finfo(gram.dtype).eps)
    inv_evals = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    inverse[failed] = ((evecs * inv_evals.unsqueeze(-2)) @ evecs.mT).to(gram.dtype)
    return inverse


def _blocks(t: Tensor, blocks: int, dtype: torch.dtype) -> Tensor:
    """A factor or its gradient as ``blocks`` matrices: A (k r, n...) -> (k, r, n), B (k m, r...) -> (k, m, r)."""
    return t.detach().reshape(blocks, t.shape[0] // blocks, t.numel() // t.shape[0]).to(dtype)


@torch.no_grad()
def preconditioned_directions(
    pairs: Sequence[Pair], grads: Sequence[Grads], reg: float, *, batched: bool = False,
    workspace: Workspace | None = None, sums: list[Tensor] | None = None,
) -> list[tuple[Tensor | None, Tensor | None]]:  # fmt: skip
    """The update directions ``(d_A, d_B)`` of LoRA pairs ``(A, B, blocks)`` with gradients ``(∇A, ∇B)``.

    Shaped and typed like A and B; ``None`` where the gradient is ``None``. ``batched=False`` is the loop below, one
    pair at a time; ``batched=True`` gives the same directions (up to float rounding) from batched calls per bucket
    of alike factors (:func:`_batched_directions`), in buffers of ``workspace`` (kept by the caller for the same
    pairs). Sums of the directions are appended to ``sums``: a few scalars, all finite if every direction is.
    """
    if not isinstance(reg, (int, float)) or reg != reg or reg < 0:
        raise ValueError(f"reg must be a number >= 0, got {reg!r}")
    if len(pairs) != len(grads):
        raise ValueError(f"got {len(grads)} gradient pairs for {len(pairs)} LoRA pairs")
    if batched:
        return _batched_directions(pairs, grads, reg, workspace or Workspace(reuse=False), sums)
    directions = []
    for (A, B, k), (grad_A, grad_B) in zip(pairs, grads):
        dtype = compute_dtype(A.dtype)
        a, b = _blocks(A, k, dtype), _blocks(B, k, dtype)  # (k, r, n), (k, m, r)
        d_A = d_B = None
        if grad_A is not None:
            d_A = inverse_gram(b.mT @ b, reg) @ _blocks(grad_A, k, dtype)  # (BᵀB + reg I)⁻¹ ∇A
            d_A = d_A.reshape(A.shape).to(A.dtype)
        if grad_B is not None:
            d_B = _blocks(grad_B, k, dtype) @ inverse_gram(a @ a.mT, reg)  # ∇B (AAᵀ + reg I)⁻¹
            d_B = d_B.reshape(B.shape).to(B.dtype)
        directions.append((d_A, d_B))
        if sums is not None:
            sums.extend(d.sum() for d in (d_A, d_B) if d is not None)
    return directions


class _Bucket(NamedTuple):
    """The factors on one ``side`` (0: A, partner B; 1: B, partner A) of the pairs ``members`` (indices), alike in
    shapes, blocks, dtype and device; ``stacked`` when small enough to be stacked into one tensor."""

    side: int
    members: list[int]
    stacked: bool
    workspace: Workspace


def _buckets(pairs: Sequence[Pair], has_grad: tuple, reuse: bool) -> list[_Bucket]:
    members = defaultdict(list)
    for i, ((A, B, k), present) in enumerate(zip(pairs, has_grad)):
        for side in (0, 1):
            if present[side]:
                members[(side, A.shape, B.shape, k, A.dtype, A.device)].append(i)
    return [
        _Bucket(side, ids, pairs[ids[0]][side].numel() <= STACK_MAX_NUMEL, Workspace(reuse))
        for (side, *_), ids in members.items()
    ]


def _chunks(bucket: _Bucket, name: str, buffer: Tensor, shape: tuple) -> Sequence[Tensor]:
    """``buffer`` cut into the bucket's chunks: itself if stacked, else one view of ``shape`` per pair."""
    return [buffer] if bucket.stacked else bucket.workspace.views(name, buffer, shape)


def _batched_directions(pairs: Sequence[Pair], grads: Sequence[Grads], reg: float, workspace: Workspace, sums):
    """:func:`preconditioned_directions`, bucket by bucket: in a stacked bucket the partners and the gradients are
    stacked so that each product is one call for all its pairs; otherwise every pair gets its own products. The
    r x r work is batched in both. A bucket's directions are views of one buffer."""
    has_grad = tuple((g_A is not None, g_B is not None) for g_A, g_B in grads)
    directions = [[None, None] for _ in pairs]
    for bucket in workspace.memo("buckets", has_grad, lambda: _buckets(pairs, has_grad, workspace.reuse)):
        side, ids, work = bucket.side, bucket.members, bucket.workspace
        A, B, k = pairs[ids[0]]
        factor, partner = (A, B) if side == 0 else (B, A)
        dtype, device, count, r = compute_dtype(A.dtype), A.device, len(ids), B.shape[1]
        # each block as a matrix: partner B (m, r) and gradient ∇A (r, n) on side 0, A (r, n) and ∇B (m, r) on 1
        partner_block = (partner.shape[0] // k, partner.numel() // partner.shape[0])
        grad_block = (factor.shape[0] // k, factor.numel() // factor.shape[0])
        out = work.empty("out", (count, *factor.shape), factor.dtype, device)
        partners, grad = [pairs[i][1 - side] for i in ids], [grads[i][side] for i in ids]
        if bucket.stacked:  # one chunk holding every block of the bucket
            partners = [torch.stack(partners, out=work.empty("partners", (count, *partner.shape), A.dtype, device))]
            grad = [torch.stack(grad, out=work.empty("grads", out.shape, A.dtype, device))]
        chunk = (count * k,) if bucket.stacked else (k,) if k > 1 else ()  # leading dims of a chunk's matrices
        partners = [p.detach().reshape(*chunk, *partner_block).to(dtype) for p in partners]
        grad = [g.reshape(*chunk, *grad_block).to(dtype) for g in grad]
        grams = work.empty("grams", (count * k, r, r), dtype, device)
        for p, gram in zip(partners, _chunks(bucket, "grams", grams, (*chunk, r, r))):
            torch.matmul(p.mT, p, out=gram) if side == 0 else torch.matmul(p, p.mT, out=gram)  # BᵀB or AAᵀ
        inverse = inverse_gram(grams, reg, work)
        inverses = _chunks(bucket, "inverses", inverse, (*chunk, r, r))
        for inv, g, target in zip(inverses, grad, _chunks(bucket, "outs", out, factor.shape)):
            left, right = (inv, g) if side == 0 else (g, inv)  # (BᵀB + reg I)⁻¹ ∇A or ∇B (AAᵀ + reg I)⁻¹
            if target.dtype == dtype:
                torch.matmul(left, right, out=target.view(g.shape))
            else:
                target.view(g.shape).copy_(left @ right)
        for i, d in zip(ids, work.views("directions", out, factor.shape)):
            directions[i][side] = d
        if sums is not None:
            sums.append(out.sum())
    return directions
