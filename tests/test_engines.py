"""Engines that flatten parameters (DeepSpeed ZeRO, FSDP1 without use_orig_params) get a clear error, never maths on
flat partitions: hand-made parameters carrying their marks, and DeepSpeed ZeRO-1/2 itself when it is installed.

FSDP1 (FullyShardedDataParallel) needs an accelerator in torch 2.13 ("FSDP needs a non-CPU accelerator device"), so
its FlatParameter is made by hand here (torch's own class, which FSDP1 puts in place of the module's parameters).
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.fsdp._flat_param import FlatParameter

from _tiny import MixedModel
from core import ScaledGD, build_optimizer
from core.sharded import FlattenedParameterError

X = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
Y = torch.arange(8) % 2


def test_fsdp1_flat_parameter_is_refused_naming_the_engine_and_the_routes():
    model = nn.Module()  # what FSDP1(use_orig_params=False) leaves: one FlatParameter per wrapped module
    model._fsdp_wrapped_module = nn.Module()
    model._fsdp_wrapped_module._flat_param = FlatParameter(torch.randn(182), requires_grad=True)
    with pytest.raises(FlattenedParameterError, match=r"'_fsdp_wrapped_module\._flat_param' of shape \(182,\)") as e:
        build_optimizer(model, "scaled_adamw")
    assert "FSDP1" in str(e.value) and "use_orig_params=True" in str(e.value) and "FSDP2" in str(e.value)
    opt = build_optimizer(model, "adamw", lr=1e-2)  # elementwise: fine on a flat partition
    model._fsdp_wrapped_module._flat_param.grad = torch.ones(182)
    opt.step()


def test_deepspeed_zero3_partition_is_refused():
    model = MixedModel()
    a = model.l1.lora_down.weight
    flat = nn.Parameter(torch.empty(0))  # ZeRO-3 keeps an empty placeholder with the partition's metadata
    flat.ds_id, flat.ds_numel, flat.ds_shape = 0, a.numel(), a.shape
    model.l1.lora_down.weight = flat
    with pytest.raises(FlattenedParameterError, match=r"'l1\.lora_down\.weight' .*DeepSpeed ZeRO-3"):
        build_optimizer(model, "scaled_gd")
    with pytest.raises(FlattenedParameterError, match="DeepSpeed ZeRO-3"):  # also when built from the pairs
        ScaledGD([{"lora_pairs": [(flat, model.l1.lora_up.weight)]}])


def test_group_swapped_for_a_flat_partition_is_refused_before_anything_changes():
    model = MixedModel()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flat = nn.Parameter(torch.randn(numel))  # DeepSpeed ZeRO-1/2: the group's params become one flat fp32 partition
    flat.grad = torch.randn(numel)
    opt.param_groups[0]["params"] = [flat]
    before = flat.detach().clone()
    with pytest.raises(FlattenedParameterError, match=r"now holds 1 tensor\(s\) of shapes \[\(\d+,\)\]"):
        opt.step()
    assert torch.equal(flat, before) and not opt.state


def test_factor_reshaped_to_1d_is_refused_at_the_step():
    model = MixedModel()
    opt = build_optimizer(model, "scaled_gd", lr=1e-2)
    group = opt.param_groups[0]
    a, b, _ = group["pairs"][0]
    flat = nn.Parameter(group["params"][a].detach().reshape(-1))
    flat.grad = torch.ones_like(flat)
    group["params"][a] = flat
    with pytest.raises(FlattenedParameterError, match=r"LoRA factor 'l1\.lora_down\.weight' has shape \(36,\)"):
        opt.step()


DEEPSPEED_SCRIPT = textwrap.dedent(
    """
    import sys, torch, deepspeed
    from _tiny import MixedModel
    from core import ScaledGD, build_optimizer
    from core.sharded import FlattenedParameterError
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for stage in (1, 2):
        model = MixedModel()
        config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, "scaled_adamw", lr=1e-2),
                                          config=config)
        x, y = torch.randn(4, 12), torch.arange(4) % 2
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        try:
            engine.step()
            results.append(f"stage {stage}: stepped")
        except FlattenedParameterError as error:
            results.append(f"stage {stage}: {error}")
    if torch.distributed.get_rank() == 0:
        open(sys.argv[1], "w").write("\\n".join(results))
    torch.distributed.barrier()
    """
)


def test_deepspeed_zero_1_and_2_with_a_client_optimizer_give_the_clear_error(tmp_path):
    pytest.importorskip("deepspeed")
    script, out = tmp_path / "zero.py", tmp_path / "zero.txt"
    script.write_text(DEEPSPEED_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))  # fmt: skip
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
           str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    for stage, line in zip((1, 2), lines):
        assert line.startswith(f"stage {stage}: a parameter group with LoRA pairs") and "DeepSpeed ZeRO" in line
        assert "FSDP1 with use_orig_params=True" in line
