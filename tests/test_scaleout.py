"""Scaling out: the Trainer optimizer factory (one process, DDP, FSDP2 where a GPU pair allows it), multi-process
GPT-2 runs (one record, the mean loss over ranks, the same run as one process with the same global batch), the
launch checks, and Hydra sweeps through the shared submitit launcher configs."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import core
import harness
from harness import REPO_ROOT
from _tiny import tiny_peft_llama

TESTS = Path(__file__).resolve().parent
PYTHONPATH = os.pathsep.join([str(REPO_ROOT), str(TESTS)])


def free_port() -> int:
    """A port nothing else holds (a fixed one can linger from an earlier run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, cwd: Path | None = None, timeout: int = 300,
             **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args`` with this checkout on the path and one thread a process."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1",
                   "WANDB_MODE": "disabled", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), *args]
    return subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# The Trainer route: optimizer_cls_and_kwargs=(trainer_optimizer(name), hparams)

class Tokens(torch.utils.data.Dataset):
    """16 random sequences of 12 tokens (every token a label: equal token counts in every batch)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer_args(output_dir, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=16, max_steps=1, report_to=[],
                    logging_steps=1, save_strategy="no", use_cpu=True, dataloader_num_workers=0, max_grad_norm=0.0)
    return TrainingArguments(**{**settings, **overrides})


HPARAMS = {"lr": 1e-2, "betas": (0.7, 0.8), "weight_decay": 0.01, "reg": 1e-6}


def test_the_factory_is_what_trainer_calls_and_builds_build_optimizer():
    from transformers.trainer_optimizer import is_optimizer_factory

    factory = core.trainer_optimizer("scaled_adamw")
    assert is_optimizer_factory(factory) and repr(factory) == "trainer_optimizer('scaled_adamw')"
    model = tiny_peft_llama()
    built = factory()(model, **HPARAMS)
    reference = core.build_optimizer(model, "scaled_adamw", **HPARAMS)
    assert type(built) is type(reference) and len(built.param_groups) == len(reference.param_groups)
    assert [len(g["pairs"]) for g in built.param_groups] == [len(g["pairs"]) for g in reference.param_groups] != [0]
    with pytest.raises(ValueError, match="unknown optimizer 'scaled_adam'"):
        core.trainer_optimizer("scaled_adam")
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['reg'\] for optimizer 'adamw'"):
        core.trainer_optimizer("adamw")()(model, lr=1e-3, reg=1.0)


def test_the_harness_factory_builds_the_peers_too():
    model = tiny_peft_llama()
    peer = harness.trainer_optimizer("loraplus")()(model, lr=2e-4)
    assert type(peer) is type(harness.build_optimizer(model, "loraplus", lr=2e-4))
    with pytest.raises(ValueError, match="unknown optimizer 'lora_plus'"):
        harness.trainer_optimizer("lora_plus")


def one_manual_step(model, name, hparams):
    """One step of ``core.build_optimizer`` on the whole of :class:`Tokens` (Trainer's single batch)."""
    optimizer = core.build_optimizer(model, name, **hparams)
    batch = torch.stack([Tokens()[i]["input_ids"] for i in range(len(Tokens()))])
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["scaled_adamw", "scaled_gd"])
def test_trainer_through_the_factory_preconditions_the_pairs(tmp_path, name):
    from transformers import Trainer

    hparams = {k: v for k, v in HPARAMS.items() if name == "scaled_adamw" or k in ("lr", "reg")}
    model = tiny_peft_llama()
    twin = copy.deepcopy(model)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=Tokens(),
                      optimizer_cls_and_kwargs=(core.trainer_optimizer(name), hparams))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert sum(len(g["pairs"]) for g in optimizer.param_groups) == len(core.find_lora_pairs(model)) == 4
    one_manual_step(twin, name, hparams)
    plain = tiny_peft_llama()  # the same step without the preconditioner moves the factors elsewhere
    one_manual_step(plain, name.removeprefix("scaled_").replace("gd", "sgd"),
                    {k: v for k, v in hparams.items() if k != "reg"})
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    preconditioned = [n for (n, p), r in zip(model.named_parameters(), plain.parameters())
                      if "lora_A" in n and not torch.allclose(p, r, rtol=1e-3, atol=1e-6)]
    assert preconditioned


TRAINER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import Trainer
    from _tiny import tiny_peft_llama
    from test_scaleout import Tokens, trainer_args
    import core
    torch.set_num_threads(1)
    name, hparams, out, fsdp = sys.argv[1], eval(sys.argv[2]), sys.argv[3], sys.argv[4] == "fsdp2"
    sharding = dict(use_cpu=False, fsdp=True, fsdp_config={"fsdp_version": 2,
                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) if fsdp else {}
    model = tiny_peft_llama()
    args = trainer_args(out + "_trainer", per_device_train_batch_size=2, max_steps=3, **sharding)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      optimizer_cls_and_kwargs=(core.trainer_optimizer(name), hparams))
    trainer.train()
    assert trainer.is_fsdp_enabled == fsdp, trainer.accelerator.distributed_type
    trained = {n: p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's DTensor shards, gathered
               for n, p in model.named_parameters() if p.requires_grad}
    if trainer.is_world_process_zero():
        torch.save({n: p.detach().cpu() for n, p in trained.items()}, out)
    """
)


def run_trainer_route(tmp_path, name, sharding, rtol, atol):
    """The Trainer route with 2 processes x 2 sequences a step ends where one process with 4 a step ends."""
    from transformers import Trainer

    hparams = {k: v for k, v in HPARAMS.items() if name.startswith("scaled_") or k != "reg"}
    script = tmp_path / "trainer_route.py"
    script.write_text(TRAINER_SCRIPT)
    done = torchrun(script, name, repr(hparams), str(tmp_path / "two.pt"), sharding)
    assert done.returncode == 0, done.stderr[-3000:]
    model = tiny_peft_llama()
    Trainer(model=model, args=trainer_args(tmp_path / "single", per_device_train_batch_size=4, max_steps=3),
            train_dataset=Tokens(), optimizer_cls_and_kwargs=(core.trainer_optimizer(name), hparams)).train()
    two = torch.load(tmp_path / "two.pt")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(two) == set(trained)
    for n, p in trained.items():
        torch.testing.assert_close(two[n], p.detach(), rtol=rtol, atol=atol, msg=n)


@pytest.mark.slow
def test_the_trainer_route_under_two_process_ddp_equals_one_process(tmp_path):
    """Trainer with use_cpu under torchrun: accelerate's MULTI_CPU (DDP over gloo)."""
    run_trainer_route(tmp_path, "scaled_adamw", "ddp", rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate turns FSDP on only for GPU-type backends "
                    f"(on a CPU its MULTI_CPU mode is DDP); this machine has {torch.cuda.device_count()} CUDA GPUs")
@pytest.mark.parametrize("name", ["adamw"])
def test_the_trainer_route_under_fsdp2_equals_one_process(tmp_path, name):
    run_trainer_route(tmp_path, name, "fsdp2", rtol=1e-4, atol=1e-5)
