"""LoRA factors sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``), and parameters no optimizer can pair.

Under ``fully_shard`` every parameter is a DTensor split by rows, ``(Shard(0),)`` on a 1-D device mesh: rank i holds
rows ``[i c, min((i + 1) c, rows))`` with ``c = ceil(rows / world)`` (``torch.chunk``'s split, so a rank may hold no
row at all). The directions of a pair A (k r x n), B (k m x r) with k merged blocks are then computed exactly as
the unsharded ones, each rank producing its own rows::

    BᵢᵀBᵢ = Σ_ranks (local rows of Bᵢ)ᵀ (local rows of Bᵢ)     one all-reduce of the r x r partial Grams
    A, ∇A                                                    one all-gather (they are k r x n: small)
    d_A   = this rank's rows of (BᵢᵀBᵢ + reg I)⁻¹ ∇Aᵢ
    d_B   = (local rows of ∇Bᵢ) (AᵢAᵢᵀ + reg I)⁻¹             local, row by row

The large factor B and its gradient are never gathered. Per parameter group and step that is one all-reduce of
the Grams of all pairs, one all-gather of all A and ∇A, and one all-reduce of the directions' sums (so that every
rank takes the same decision in the finiteness check). The directions are DTensors placed like the parameters, so
torch's SGD/AdamW update them shard by shard and keep their state (momentum buffers, ``exp_avg``, ``exp_avg_sq``)
sharded alike, which ``torch.distributed.checkpoint`` saves and loads.

Engines that replace the parameters by flat 1-D partitions (DeepSpeed ZeRO, FSDP1 without ``use_orig_params``)
hide the factor shapes the preconditioner needs: :func:`check_not_flattened` names them and the supported routes.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from .preconditioner import compute_dtype, inverse_gram

__all__ = [
    "FlattenedParameterError", "ShardingError", "all_finite", "check_not_flattened", "check_parameters_not_flattened",
    "check_sharding", "sharded_directions",
]  # fmt: skip

SUPPORTED_ROUTES = (
    "DDP (torch.nn.parallel.DistributedDataParallel), FSDP2 (torch.distributed.fsdp.fully_shard on a 1-D mesh) or "
    "FSDP1 with use_orig_params=True"
)


class ShardingError(ValueError):
    """A DTensor parameter placed in a way the LoRA optimizers cannot precondition exactly."""


class FlattenedParameterError(ValueError):
    """Parameters replaced by flat partitions (DeepSpeed ZeRO, FSDP1 without use_orig_params)."""


def _engine(t: Tensor) -> str | None:
    """The engine that flattened ``t``, from the attributes it leaves on its parameters; ``None`` if none did."""
    if hasattr(t, "ds_id") or hasattr(t, "ds_numel"):
        return "DeepSpeed ZeRO-3"
    if getattr(t, "_is_flat_param", False) or type(t).__name__ == "FlatParameter":
        return "FSDP1 (FullyShardedDataParallel) without use_orig_params=True"
    return None


def flattened_error(what: str, engine: str | None) -> FlattenedParameterError:
    engine = engine or "an engine that flattens parameters (DeepSpeed ZeRO, or FSDP1 without use_orig_params=True)"
    return FlattenedParameterError(
        f"{what}: the parameters were replaced by flat 1-D partitions by {engine}, which hide the LoRA factor shapes "
        f"that the preconditioner needs; use {SUPPORTED_ROUTES} (plain 'adamw'/'sgd' are elementwise and do run "
        "on flat partitions)"
    )


def check_parameters_not_flattened(named_parameters) -> None:
    """Raise :class:`FlattenedParameterError` for the first of ``(name, parameter)`` that an engine flattened."""
    for name, p in named_parameters:
        engine = _engine(p)
        if engine:
            raise flattened_error(f"parameter '{name}' of shape {tuple(p.shape)}", engine)


def check_not_flattened(group: dict) -> None:
    """Raise :class:`FlattenedParameterError` unless the group's LoRA pairs still point at their factors.

    Flattening shows as a factor with engine attributes (DeepSpeed's ``ds_id``/``ds_numel``, FSDP1's
    ``FlatParameter``), a 1-D factor, pair indices past the end of ``params`` (DeepSpeed ZeRO-1/2 swap a group's
    parameters for one flat partition) or factors whose shapes no longer chain.
    """
    params, names = group["params"], group["param_names"]
    for a, b, blocks in group["pairs"]:
        if max(a, b) >= len(params):
            shapes = [tuple(p.shape) for p in params[:3]]
            raise flattened_error(
                f"a parameter group with LoRA pairs '{names[a]}', '{names[b]}' now holds {len(params)} tensor(s) "
                f"of shapes {shapes}{' ...' if len(params) > 3 else ''}", _engine(params[0]) if params else None
            )  # fmt: skip
        for i in (a, b):
            engine = _engine(params[i])
            if engine or params[i].dim() < 2:
                raise flattened_error(f"LoRA factor '{names[i]}' has shape {tuple(params[i].shape)}", engine)
        A, B = params[a], params[b]
        if A.shape[0] != blocks * B.shape[1]:
            raise flattened_error(
                f"LoRA factors '{names[a]}' {tuple(A.shape)} and '{names[b]}' {tuple(B.shape)} no longer chain",
                _engine(A) or _engine(B),
            )  # fmt: skip


def _describe(p: DTensor) -> str:
    return f"placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh of shape {tuple(p.device_mesh.shape)}"


def check_sharding(group: dict):
    """The device mesh of the group's DTensor parameters (``None`` if it has none), after checking that they are
    all row-sharded ``(Shard(0),)`` on one 1-D mesh and that no LoRA pair mixes a DTensor with a plain tensor;
    :class:`ShardingError` naming the parameter and its placements otherwise."""
    params, names, mesh = group["params"], group["param_names"], None
    for p, name in zip(params, names):
        if not isinstance(p, DTensor):
            continue
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ShardingError(
                f"parameter '{name}' is a DTensor with {_describe(p)}; the LoRA optimizers support FSDP2's row "
                "sharding only: (Shard(0),) on a 1-D mesh, as fully_shard(model) gives (no 2-D/HSDP mesh, no "
                "Shard(1), no Replicate)"
            )
        if mesh is None:
            mesh, first = p.device_mesh, name
        elif p.device_mesh != mesh:
            raise ShardingError(
                f"parameter '{name}' is sharded on mesh {p.device_mesh} but '{first}' of the same parameter group on "
                f"mesh {mesh}; a parameter group must live on one device mesh"
            )
    for a, b, _ in group["pairs"]:
        if isinstance(params[a], DTensor) != isinstance(params[b], DTensor):
            sharded, plain = (a, b) if isinstance(params[a], DTensor) else (b, a)
            raise ShardingError(
                f"LoRA factor '{names[sharded]}' is a DTensor ({_describe(params[sharded])}) but its partner "
                f"'{names[plain]}' is a plain tensor; shard both (fully_shard the module that holds them)"
            )
    return mesh


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite; for a DTensor, of every shard (an all-reduce over its mesh, so
    every rank gets the same answer)."""
    if not isinstance(t, DTensor):
        return bool(torch.isfinite(t).all())
    flag = torch.isfinite(t.to_local()).all().to(torch.int32)
    for dim in range(t.device_mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=t.device_mesh.get_group(dim))
    return bool(flag)


def _rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` that ``Shard(0)`` gives ``rank`` of ``world`` (``torch.chunk``'s split)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


class _ShardedPair(NamedTuple):
    """A pair's layout on this rank: A's rows ``[a_rows)`` of ``k r``, B's rows ``[b_rows)`` of ``k m``."""

    index: int  # position among the group's pairs
    blocks: int
    rank: int  # r
    a_cols: int  # columns of A as a matrix (a convolution kernel flattened)
    a_rows: tuple[int, int]
    b_rows: tuple[int, int]
    a_rows_by_rank: list[tuple[int, int]]


def _layout(index: int, A: DTensor, B: DTensor, blocks: int, names: tuple[str, str]) -> _ShardedPair:
    mesh = A.device_mesh
    world, me = mesh.size(), mesh.get_local_rank()
    for p, name in zip((A, B), names):
        start, stop = _rows(p.shape[0], world, me)
        if p.to_local().shape[0] != stop - start:
            raise ShardingError(
                f"parameter '{name}' of {p.shape[0]} rows holds {p.to_local().shape[0]} rows on rank {me} of "
                f"{world}; expected {stop - start} (Shard(0) splits rows as torch.chunk does)"
            )
    a_rows_by_rank = [_rows(A.shape[0], world, i) for i in range(world)]
    return _ShardedPair(
        index, blocks, B.shape[1], A.shape[1:].numel(), a_rows_by_rank[me], _rows(B.shape[0], world, me),
        a_rows_by_rank,
    )


def _block_slices(rows: tuple[int, int], block_rows: int, blocks: int):
    """``(block, local slice)`` for each block that the global rows ``[start, stop)`` overlap."""
    start, stop = rows
    for j in range(blocks):
        lo, hi = max(start, j * block_rows), min(stop, (j + 1) * block_rows)
        if lo < hi:
            yield j, slice(lo - start, hi - start)


def _all_reduce(tensors: list[Tensor], group) -> list[Tensor]:
    """Sums over the ranks of ``tensors`` (of one dtype), by one all-reduce of their concatenation."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _all_gather_rows(locals_: list[Tensor], rows_by_rank: list[list[tuple[int, int]]], group) -> list[Tensor]:
    """The full matrices whose row shards (rank i holds ``rows_by_rank[k][i]`` of matrix k) are ``locals_``
    (matrices of one dtype), by one all-gather of each rank's shards packed into one buffer."""
    if not locals_:
        return []
    cols = [t.shape[1] for t in locals_]
    world = len(rows_by_rank[0])
    sizes = [sum((rows[i][1] - rows[i][0]) * c for rows, c in zip(rows_by_rank, cols)) for i in range(world)]
    packed = locals_[0].new_zeros(max(sizes))
    torch.cat([t.reshape(-1) for t in locals_], out=packed[: sizes[dist.get_rank(group)]])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    pieces = [[] for _ in locals_]
    for i, buffer in enumerate(gathered):
        offset = 0
        for k, (rows, c) in enumerate(zip(rows_by_rank, cols)):
            n = (rows[i][1] - rows[i][0]) * c
            pieces[k].append(buffer[offset : offset + n].view(-1, c))
            offset += n
    return [torch.cat(p) for p in pieces]


def _sharded_pair_directions(layouts, pairs, grads, reg: float, group) -> dict[int, list]:
    """The local directions (plain tensors, in the factors' dtype) of the row-sharded pairs of one compute dtype."""
    grams, gather, gather_rows = [], [], []
    for lay, (A, B, k), (g_A, g_B) in zip(layouts, pairs, grads):
        dtype = compute_dtype(A.dtype)
        if g_A is not None:  # the partial Grams of B's blocks from this rank's rows
            b = B.to_local().detach().reshape(-1, lay.rank).to(dtype)
            gram = b.new_zeros(k, lay.rank, lay.rank)
            for j, rows in _block_slices(lay.b_rows, B.shape[0] // k, k):
                torch.matmul(b[rows].mT, b[rows], out=gram[j])
            grams.append(gram)
            gather.append(g_A.to_local().reshape(-1, lay.a_cols).to(dtype))
            gather_rows.append(lay.a_rows_by_rank)
        if g_B is not None:
            gather.append(A.to_local().detach().reshape(-1, lay.a_cols).to(dtype))
            gather_rows.append(lay.a_rows_by_rank)
    b_grams, full = iter(_all_reduce(grams, group)), iter(_all_gather_rows(gather, gather_rows, group))
    grams, operands = [], []  # per pair: its Grams (BᵀB if ∇A, then AAᵀ if ∇B) and ∇A of all blocks
    for lay, (A, B, k), (g_A, g_B) in zip(layouts, pairs, grads):
        if g_A is not None:
            grams.append(next(b_grams))
            operands.append(next(full).view(k, lay.rank, lay.a_cols))
        if g_B is not None:
            a = next(full).view(k, lay.rank, lay.a_cols)
            grams.append(a @ a.mT)
    inverses = iter(_inverses(grams, reg))
    operands = iter(operands)
    out = {}
    for lay, (A, B, k), (g_A, g_B) in zip(layouts, pairs, grads):
        d_A = d_B = None
        if g_A is not None:  # this rank's rows of (BᵀB + reg I)⁻¹ ∇A: its rows of the inverse times ∇A
            inverse, full_grad_A = next(inverses), next(operands)
            d = full_grad_A.new_empty(lay.a_rows[1] - lay.a_rows[0], lay.a_cols)
            for j, rows in _block_slices(lay.a_rows, lay.rank, k):
                first = lay.a_rows[0] + rows.start - j * lay.rank  # the block's row of this rank's first row in it
                torch.matmul(inverse[j, first : first + rows.stop - rows.start], full_grad_A[j], out=d[rows])
            d_A = d.to(A.dtype).view(A.to_local().shape)
        if g_B is not None:  # ∇B (AAᵀ + reg I)⁻¹, row block by row block
            inverse = next(inverses)
            g = g_B.to_local().reshape(-1, lay.rank).to(inverse.dtype)
            d = torch.empty_like(g)
            for j, rows in _block_slices(lay.b_rows, B.shape[0] // k, k):
                torch.matmul(g[rows], inverse[j], out=d[rows])
            d_B = d.to(B.dtype).view(B.to_local().shape)
        out[lay.index] = [d_A, d_B]
    return out


def _inverses(grams: list[Tensor], reg: float) -> list[Tensor]:
    """:func:`core.preconditioner.inverse_gram` of each (k, r, r) batch, one call per size r."""
    by_rank: dict[int, list[int]] = {}
    for i, gram in enumerate(grams):
        by_rank.setdefault(gram.shape[-1], []).append(i)
    out: list[Tensor] = [None] * len(grams)
    for ids in by_rank.values():
        inverse = inverse_gram(torch.cat([grams[i] for i in ids]), reg)
        for i, chunk in zip(ids, inverse.split([grams[i].shape[0] for i in ids])):
            out[i] = chunk
    return out


def _as_placed(local: Tensor | None, like: DTensor) -> DTensor | None:
    if local is None:
        return None
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip


@torch.no_grad()
def sharded_directions(
    group: dict, vectors: Sequence[Tensor | None], precondition: bool, mesh, sums: list[Tensor] | None,
    plain_directions,
) -> list[Tensor | None]:  # fmt: skip
    """The update directions of a parameter group whose parameters are (some or all) DTensors on ``mesh``.

    ``vectors`` (gradients, or AdamW's normalised steps) are DTensors like their parameters. Row-sharded LoRA pairs
    get the directions described in the module docstring, pairs of plain tensors ``plain_directions(pairs, grads)``
    (the unsharded preconditioner), every other parameter its vector. With ``sums``, the sum over all ranks of the
    directions' local sums is appended: the same on every rank, finite if every direction is.
    """
    params, index_pairs, names = group["params"], group["pairs"], group["param_names"]
    directions, process_group = list(vectors), mesh.get_group()
    if precondition and index_pairs:
        sharded = [i for i, (a, _, _) in enumerate(index_pairs) if isinstance(params[a], DTensor)]
        plain = [i for i in range(len(index_pairs)) if i not in set(sharded)]
        per_pair = {}
        if plain:
            found = plain_directions(
                [(params[index_pairs[i][0]], params[index_pairs[i][1]], index_pairs[i][2]) for i in plain],
                [(vectors[index_pairs[i][0]], vectors[index_pairs[i][1]]) for i in plain],
            )  # fmt: skip
            per_pair.update(zip(plain, found))
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in sharded:
            by_dtype.setdefault(compute_dtype(params[index_pairs[i][0]].dtype), []).append(i)
        for ids in by_dtype.values():  # every rank walks the same dtypes in the same order
            pairs = [(params[index_pairs[i][0]], params[index_pairs[i][1]], index_pairs[i][2]) for i in ids]
            layouts = [
                _layout(i, A, B, k, (names[index_pairs[i][0]], names[index_pairs[i][1]]))
                for i, (A, B, k) in zip(ids, pairs)
            ]  # fmt: skip
            grads = [(vectors[index_pairs[i][0]], vectors[index_pairs[i][1]]) for i in ids]
            for i, (d_A, d_B) in _sharded_pair_directions(layouts, pairs, grads, group["reg"], process_group).items():
                a, b, _ = index_pairs[i]
                per_pair[i] = (_as_placed(d_A, params[a]), _as_placed(d_B, params[b]))
        for i, (a, b, _) in enumerate(index_pairs):
            directions[a], directions[b] = per_pair[i]
        paired = {j for a, b, _ in index_pairs for j in (a, b)}
    else:
        paired = set()
    for i, d in enumerate(directions):
        if i not in paired and d is not None:
            directions[i] = d.contiguous()  # torch's fused CPU AdamW mis-reads non-contiguous gradients
    if sums is not None:
        device = next(p for p in params if isinstance(p, DTensor)).to_local().device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for d in directions:
            if d is not None:
                total += (d.to_local() if isinstance(d, DTensor) else d).sum().to(device, torch.float64)
        dist.all_reduce(total, group=process_group)
        sums.append(total)
    return directions
