"""The optimizers inside the tools users train with: schedulers, GradScaler, Trainer, accelerate, DDP."""

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core import build_optimizer
from _tiny import MixedModel, tiny_peft_llama

X = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 2


def loss_of(model, x=X, y=Y):
    return torch.nn.functional.cross_entropy(model(x), y)


def test_lr_scheduler_drives_every_group():
    model = MixedModel()
    opt = build_optimizer({"a": model}, "scaled_adamw", lr=1e-2, group_overrides={"a.head": {"lr": 1e-1}})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        sched.step()
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-2 / 8, 1e-1 / 8])


def test_grad_scaler_unscales_and_skips_non_finite_steps():
    model = MixedModel()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(twin, "scaled_adamw", lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model)).backward()
        scaler.step(opt)
        scaler.update()
        twin_opt.zero_grad()
        loss_of(twin).backward()
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_of(model) * float("inf")).backward()
    scaler.step(opt)  # skipped: the scaler found infs, the optimizer never sees them
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_transformers_trainer_accepts_the_optimizer(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    class Tokens(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    model = tiny_peft_llama()
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2, betas=(0.7, 0.8), weight_decay=0.01, reg=1e-6)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
    result = trainer.train()
    assert result.global_step == 4
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # accelerate may wrap it
    end = [p for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(start, end))


def test_accelerate_prepare_and_step():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = MixedModel()
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, "scaled_gd", lr=0.1, reg=1e-4)
    model, opt = accelerator.prepare(model, opt)
    twin_opt = build_optimizer(twin, "scaled_gd", lr=0.1, reg=1e-4)
    for _ in range(3):
        opt.zero_grad()
        accelerator.backward(loss_of(model))
        opt.step()
        twin_opt.zero_grad()
        loss_of(twin).backward()
        twin_opt.step()
    for a, b in zip(accelerator.unwrap_model(model).parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    state = opt.state_dict()
    assert "pairs" in state["param_groups"][0]



@pytest.mark.parametrize("name", ["scaled_gd", "scaled_adamw"])
def test_a_state_saved_through_accelerate_loads_into_a_prepared_optimizer(name):
    """accelerate.prepare adds entries of its own to the optimizer's defaults (``differentiable``): a state saved
    before them, or by a fresh optimizer, still loads, and the resumed step equals the uninterrupted one."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = MixedModel()
    opt = accelerator.prepare(build_optimizer(model, name, lr=0.05, reg=1e-4))
    plain = build_optimizer(copy.deepcopy(model), name, lr=0.05, reg=1e-4)
    saved = copy.deepcopy(plain.state_dict())  # no accelerate entries in it
    opt.load_state_dict(saved)
    opt.zero_grad()
    accelerator.backward(loss_of(model))
    opt.step()
    again = accelerator.prepare(build_optimizer(copy.deepcopy(model), name, lr=0.05, reg=1e-4))
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["state"].keys() == opt.state_dict()["state"].keys()

DDP_SCRIPT = textwrap.dedent(
    """
    import os
    import torch, torch.distributed as dist
    from _tiny import MixedModel
    from core import build_optimizer
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(MixedModel())
    opt = build_optimizer(model.module, "scaled_adamw", lr=1e-2, reg=1e-6)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 2
    shard = slice(rank * 16 // world, (rank + 1) * 16 // world)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
        opt.step()
    if rank == 0:
        torch.save(model.module.state_dict(), {out!r})
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()
    """
)


def test_two_process_ddp_equals_single_process(tmp_path):
    script = tmp_path / "ddp.py"
    out = tmp_path / "ddp.pt"
    script.write_text(DDP_SCRIPT.format(out=str(out)))
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    with socket.socket() as free:  # a port nothing else holds (a fixed one can linger from an earlier run)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    single = MixedModel()
    opt = build_optimizer(single, "scaled_adamw", lr=1e-2, reg=1e-6)
    for _ in range(5):
        opt.zero_grad()
        loss_of(single).backward()
        opt.step()
    ddp_state = torch.load(out)
    for name, p in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], p, rtol=1e-5, atol=1e-6)
