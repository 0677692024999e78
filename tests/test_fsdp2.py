"""FSDP2 (fully_shard) on gloo, 2 and 3 processes: every optimizer equals the single-process run.

One torchrun launch per world size runs every scenario of tests/_fsdp2_worker.py (10 steps each) on the model
with a Linear, a merged, a conv and an embedding LoRA pair and a trainable head, r = 4 (over 3 ranks the A shards
have 2, 2 and 0 rows); the tests compare what it saved with the same training in this process.
"""

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _fsdp2_worker import OPTIMIZERS, STEPS, AllPairsModel, train
from core import build_optimizer

TESTS = Path(__file__).resolve().parent
WORLDS = (2, 3)


def _free_port() -> int:
    with socket.socket() as free:  # a port nothing else holds (a fixed one can linger from an earlier run)
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def _sharded_results(world: int, out_dir: str) -> dict:
    out = Path(out_dir) / f"fsdp2_{world}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_free_port()}",
        str(TESTS / "_fsdp2_worker.py"), str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}proc")
def sharded(request, tmp_path_factory):
    return _sharded_results(request.param, str(tmp_path_factory.mktemp("fsdp2")))


@functools.cache
def _single(name: str, dtype: torch.dtype = torch.float32) -> dict:
    torch.set_num_threads(1)
    optimizer, hparams = OPTIMIZERS[name]
    model = AllPairsModel().to(dtype)
    train(model, build_optimizer(model, optimizer, **hparams), range(STEPS), dtype=dtype)
    return {n: p.detach() for n, p in model.named_parameters()}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


# The sharded float32 run sums the same terms in another order (the shards' partial sums, then the all-reduce):
# its distance from the exact (float64) training is float32 rounding of the same kind as the single-process run's,
# which is measured here for each optimizer (E = max |single float32 - single float64|). Two float32 runs that each
# lie within their rounding of the exact one may differ by about 2 E; measured on 2 and 3 processes under the default
# CPU kernels and under ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE, the largest difference was 2.8 E (AdamW
# without bias correction, whose first steps divide by a tiny second moment). FLOAT32_ROUNDINGS = 8 leaves room for
# another CPU's kernels; a sharding fault moves the parameters by orders of magnitude more (the last assertion:
# training moves them by > 1e-2).
FLOAT32_ROUNDINGS = 8


def float32_rounding(name: str) -> float:
    """E: how far float32 rounding takes this optimizer's single-process training from the float64 one."""
    return _max_difference(_single(name), _single(name, torch.float64))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_step_equals_single_process(sharded, name):
    # float64: the same maths (to rounding); float32: within FLOAT32_ROUNDINGS times the run's own float32 rounding
    torch.testing.assert_close(sharded[name, "torch.float64"], _single(name, torch.float64), rtol=0, atol=1e-12)
    tolerance = FLOAT32_ROUNDINGS * float32_rounding(name)
    assert 1e-8 < tolerance < 1e-4  # the rounding of a float32 training of this size, not a loose bound
    torch.testing.assert_close(sharded[name, "torch.float32"], _single(name), rtol=0, atol=tolerance)
    assert _max_difference(_single(name), {n: p.detach() for n, p in AllPairsModel().named_parameters()}) > 1e-2


def test_fsdp2_bf16_stays_close_to_single_process_bf16(sharded):
    # parameters reach |p| ~ 2.4, where bf16's spacing is 0.0156: 0.05 is about three spacings after 10 steps
    reference = _single("scaled_adamw", torch.bfloat16)
    assert _max_difference(sharded["bf16_parameters"], reference) < 0.05
    assert _max_difference(sharded["bf16_mixed_precision"], reference) < 0.05  # MixedPrecisionPolicy(bf16)
    assert all(p.dtype == torch.float32 for p in sharded["bf16_mixed_precision"].values())  # fp32 shards


def test_fsdp2_checkpoint_resumes_exactly(sharded):
    # 5 steps, torch.distributed.checkpoint save of the model and optimizer state dicts, load into a fresh
    # model and optimizer, 5 more steps: the same parameters, bit for bit, as 10 uninterrupted steps
    resumed, uninterrupted = sharded["resumed"], sharded["scaled_adamw", "torch.float32"]
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)


def test_fsdp2_nonfinite_gradient_on_one_rank_stops_every_rank(sharded):
    messages = sharded["nonfinite_all_ranks"]
    assert len(set(messages)) == 1 and "non-finite gradient" in messages[0] and "head.weight" in messages[0]
    assert not sharded["nonfinite_changed"]


def test_fsdp2_other_placements_are_refused_naming_the_parameter(sharded):
    assert "'proj.lora_A'" in sharded["error_shard1"] and "Shard(dim=1)" in sharded["error_shard1"]
    message = sharded["error_2d_mesh"]
    assert "'embed.lora_embedding_A.default'" in message and "Replicate(), Shard(dim=0)" in message
    assert "2-D mesh" in message
    assert "'proj.lora_A' is a DTensor" in sharded["error_mixed"] and "'proj.lora_B' is a plain tensor" in sharded[
        "error_mixed"
    ]
    assert "'proj.lora_B' is sharded on mesh" in sharded["error_two_meshes"] and "one device mesh" in sharded[
        "error_two_meshes"
    ]
