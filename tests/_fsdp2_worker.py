"""A model with every kind of LoRA pair, its training run, and the FSDP2 runs that tests/test_fsdp2.py compares.

Run by torchrun (``python -m torch.distributed.run --nproc_per_node N tests/_fsdp2_worker.py OUT``): every
scenario of :data:`SCENARIOS` under ``fully_shard`` on gloo, rank 0 saving the full parameters of each to OUT
(plus the messages of the placements that must be refused). The test runs :func:`train` in one process beside it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _tiny import MergedLoraLinear  # noqa: E402
from core import NonFiniteGradientError, build_optimizer  # noqa: E402

RANK = 4  # r = 4 rows of A over 3 ranks: local shards of 2, 2 and 0 rows
BATCH, STEPS = 12, 10
# name -> (optimizer, hyperparameters)
OPTIMIZERS = {
    "sgd": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "scaled_gd": ("scaled_gd", dict(lr=0.02, momentum=0.5, weight_decay=0.01, reg=1e-3)),
    "adamw": ("adamw", dict(lr=1e-2)),
    "scaled_adamw": ("scaled_adamw", dict(lr=1e-2, reg=1e-6)),
    "scaled_adamw_update": ("scaled_adamw", dict(lr=1e-3, reg=1e-4, variant="update")),
    "scaled_adamw_no_bias_correction": ("scaled_adamw", dict(lr=1e-3, reg=1e-4, bias_correction=False)),
}


class PeftLinear(nn.Module):
    """PEFT's Linear LoRA layout: ``lora_A.default`` (r x n) and ``lora_B.default`` (m x r) beside a frozen base."""

    def __init__(self, n: int, m: int, r: int):
        super().__init__()
        self.base = nn.Linear(n, m).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftConv(nn.Module):
    """PEFT's Conv2d LoRA: a 3 x 3 ``lora_A`` (r, c, 3, 3) and a 1 x 1 ``lora_B`` (c_out, r, 1, 1)."""

    def __init__(self, c: int, c_out: int, r: int):
        super().__init__()
        self.base = nn.Conv2d(c, c_out, 3, padding=1).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Conv2d(c, r, 3, padding=1, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Conv2d(r, c_out, 1, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftEmbedding(nn.Module):
    """PEFT's Embedding LoRA: ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (dim, r)."""

    def __init__(self, num: int, dim: int, r: int):
        super().__init__()
        self.base = nn.Embedding(num, dim).requires_grad_(False)
        self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(r, num))})
        self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(dim, r) * 0.1)})

    def forward(self, ids):
        a, b = self.lora_embedding_A["default"], self.lora_embedding_B["default"]
        return self.base(ids) + F.embedding(ids, a.T) @ b.T


class AllPairsModel(nn.Module):
    """An embedding pair, a Linear pair, a merged pair (2 of 3 blocks), a conv pair and a trainable head."""

    def __init__(self, seed: int = 0, vocab: int = 20, dim: int = 12, r: int = RANK):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = PeftEmbedding(vocab, dim, r)
        self.linear = PeftLinear(dim, dim, r)
        self.merged = MergedLoraLinear(dim, r)
        self.conv = PeftConv(3, 8, r)
        self.head = nn.Linear(3 * dim + 8, 3)

    def forward(self, ids, images):
        h = torch.tanh(self.linear(self.embed(ids).mean(1)))
        h = torch.tanh(self.merged(h))
        c = torch.tanh(self.conv(images)).mean((2, 3))
        return self.head(torch.cat([h, c], 1))


def batch(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 20, (BATCH, 5), generator=g)
    images = torch.rand(BATCH, 3, 6, 6, generator=g).to(dtype)
    return ids, images, torch.randint(0, 3, (BATCH,), generator=g)


def train(model, opt, steps: range, rank: int = 0, world: int = 1, dtype=torch.float32) -> None:
    """``steps`` steps on this rank's share of each batch (the whole batch in one process)."""
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in steps:
        ids, images, labels = batch(step, dtype)
        opt.zero_grad()
        logits = model(ids[share], images[share])
        F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[share]).backward()
        opt.step()


def _sharded_model(dtype=torch.float32, mp_policy=None, mesh=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = AllPairsModel().to(dtype)
    kwargs = dict(mp_policy=mp_policy or MixedPrecisionPolicy(), mesh=mesh)
    fully_shard(model.conv, **kwargs)  # two FSDP parameter groups: the conv layer's and the rest
    fully_shard(model, **kwargs)
    return model


def _full(model) -> dict:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _check_state_is_sharded(opt) -> None:
    from torch.distributed.tensor import DTensor

    for p, state in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                v = state[key]
                assert isinstance(v, DTensor) and v.placements == p.placements, (key, type(v))


def _error_of(build) -> str:
    from core.sharded import ShardingError

    try:
        build()
    except ShardingError as error:
        return str(error)
    return "no error"


def main(out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )  # fmt: skip
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for dtype in (torch.float32, torch.float64):
        for name, (optimizer, hparams) in OPTIMIZERS.items():
            model = _sharded_model(dtype)
            opt = build_optimizer(model, optimizer, **hparams)
            train(model, opt, range(STEPS), rank, world, dtype)
            _check_state_is_sharded(opt)
            results[name, str(dtype)] = _full(model)

    model = _sharded_model()  # a non-finite gradient on one rank stops every rank, before anything changes
    opt = build_optimizer(model, "scaled_adamw", **OPTIMIZERS["scaled_adamw"][1])
    ids, images, labels = batch(0)
    F.cross_entropy(model(ids, images), labels).backward()
    if rank == 0:
        model.head.weight.grad.to_local()[0, 0] = float("nan")
    before = _full(model)
    try:
        opt.step()
        results["nonfinite"] = "no error"
    except NonFiniteGradientError as error:
        results["nonfinite"] = str(error)
    results["nonfinite_changed"] = any(not torch.equal(before[n], p) for n, p in _full(model).items())
    messages = [None] * world
    dist.all_gather_object(messages, results["nonfinite"])
    results["nonfinite_all_ranks"] = messages

    model = _sharded_model(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    opt = build_optimizer(model, "scaled_adamw", **OPTIMIZERS["scaled_adamw"][1])
    train(model, opt, range(STEPS), rank, world)
    results["bf16_mixed_precision"] = _full(model)
    model = _sharded_model(dtype=torch.bfloat16)
    opt = build_optimizer(model, "scaled_adamw", **OPTIMIZERS["scaled_adamw"][1])
    train(model, opt, range(STEPS), rank, world, dtype=torch.bfloat16)
    results["bf16_parameters"] = _full(model)

    # 5 steps, save model and optimizer with torch.distributed.checkpoint, load into fresh ones, 5 more
    checkpoint = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(checkpoint)
    model = _sharded_model()
    opt = build_optimizer(model, "scaled_adamw", **OPTIMIZERS["scaled_adamw"][1])
    train(model, opt, range(STEPS // 2), rank, world)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=checkpoint[0])  # fmt: skip
    model = _sharded_model()
    opt = build_optimizer(model, "scaled_adamw", **OPTIMIZERS["scaled_adamw"][1])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint[0])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, range(STEPS // 2, STEPS), rank, world)
    _check_state_is_sharded(opt)
    results["resumed"] = _full(model)

    mesh = init_device_mesh("cpu", (world,))
    columns = nn.Module()  # a loralib-style pair whose A is split by columns
    columns.proj = nn.Module()
    columns.proj.lora_A = nn.Parameter(distribute_tensor(torch.randn(RANK, 6), mesh, [Shard(1)]))
    columns.proj.lora_B = nn.Parameter(distribute_tensor(torch.randn(6, RANK), mesh, [Shard(0)]))
    results["error_shard1"] = _error_of(lambda: build_optimizer(columns, "scaled_adamw"))
    mixed = nn.Module()  # A sharded, its partner B a plain tensor
    mixed.proj = nn.Module()
    mixed.proj.lora_A = nn.Parameter(distribute_tensor(torch.randn(RANK, 6), mesh, [Shard(0)]))
    mixed.proj.lora_B = nn.Parameter(torch.randn(6, RANK))
    results["error_mixed"] = _error_of(lambda: build_optimizer(mixed, "scaled_adamw"))
    reversed_mesh = DeviceMesh("cpu", list(range(world))[::-1])  # the same ranks in another order: another mesh
    mixed.proj.lora_B = nn.Parameter(distribute_tensor(torch.randn(6, RANK), reversed_mesh, [Shard(0)]))
    results["error_two_meshes"] = _error_of(lambda: build_optimizer(mixed, "scaled_adamw"))
    two_d = _sharded_model(mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    results["error_2d_mesh"] = _error_of(lambda: build_optimizer(two_d, "scaled_gd"))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
