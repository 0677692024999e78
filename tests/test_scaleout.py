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
from test_mistral_train import glue_root, tiny_cfg, tiny_mistral  # noqa: F401 (fixtures)
from test_mistral_train import train_mod as mistral_train

TESTS = Path(__file__).resolve().parent
PYTHONPATH = os.pathsep.join([str(REPO_ROOT), str(TESTS)])


def free_port() -> int:
    """A port nothing else holds (a fixed one can linger from an earlier run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, cwd: Path | None = None, timeout: int = 300,
             **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args`` with this checkout on the path and one thread a process, as
    a user starts it (no ``ACCELERATE_USE_CPU``)."""
    environment = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **env}
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


def test_mistral_train_builds_its_optimizer_through_the_trainer_factory(tmp_path, tiny_mistral, glue_root,
                                                                       monkeypatch):
    """No optimizers=(opt, sched), which Trainer refuses under FSDP: the factory, and Trainer's own scheduler."""
    from transformers import Trainer

    seen = []
    create_optimizer = Trainer.create_optimizer
    monkeypatch.setattr(Trainer, "create_optimizer",
                        lambda self, *a, **kw: seen.append(self) or create_optimizer(self, *a, **kw))
    mistral_train.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, "optim=scaled_adamw", "train.max_steps=2",
                                 "train.scheduler=cosine"))
    (trainer,) = set(seen)
    factory, hparams = trainer.optimizer_cls_and_kwargs
    assert repr(factory) == "trainer_optimizer('scaled_adamw')" and hparams["reg"] == 4.5
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert sum(len(g["pairs"]) for g in optimizer.param_groups) == 10  # q, k, v, o, gate in 2 layers
    assert type(trainer.lr_scheduler).__name__ == "LambdaLR" and trainer.args.lr_scheduler_type == "cosine"
    record = json.loads(next((tmp_path / "results" / "glue").glob("*.json")).read_text())
    assert record["launch"] == {} and "world_size" not in record["tags"]  # one process: as before launch existed


# ---------------------------------------------------------------------------------------------------------------
# Multi-process experiment runs

def test_launch_info_and_the_world_size_tag():
    launch = harness.launch_info(4, batch_per_process=8, grad_accum=2)
    assert launch == {"world_size": 4, "batch_per_process": 8, "grad_accum": 2, "global_batch": 64}
    one = harness.launch_info(1, 8)
    assert one == {} and harness.record_tags({"preset": "tiny"}, one) == {"preset": "tiny"}
    tags = harness.record_tags({"preset": "tiny"}, launch)
    assert tags == {"preset": "tiny", "world_size": 4}
    names = {harness.default_run_name("adamw", {"lr": 1e-3}, 0, t) for t in ({"preset": "tiny"}, tags)}
    assert len(names) == 2 and any("_world_size-4" in n for n in names)
    with pytest.raises(ValueError, match="tags.world_size=2 is set by the launch"):
        harness.record_tags({"world_size": 2}, launch)


def test_the_record_holds_the_launch_and_older_records_without_it_still_load(tmp_path):
    launch = harness.launch_info(2, 4)
    recorder = harness.RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, tags=harness.record_tags({}, launch),
                                   launch=launch)
    with recorder:
        path = recorder.finish()
    record = json.loads(path.read_text())
    assert record["launch"] == launch and record["run_name"].startswith("adamw_lr0.001_seed0_world_size-2_")
    single = harness.RunRecorder(tmp_path, "exp", "adamw", {"lr": 1e-3}, 0, launch=harness.launch_info(1, 8))
    assert single.record.run_name == harness.default_run_name("adamw", {"lr": 1e-3}, 0, {})  # as before launch
    del record["launch"]  # a record written before the field existed
    assert harness.RunRecord.from_dict(record).launch == {}


def test_accelerate_cpu_launch_with_several_processes_is_a_clear_error(monkeypatch):
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(RuntimeError, match="accelerate's --cpu launcher starts one process"):
        harness.check_launch()
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node N"):
        harness.make_accelerator()
    monkeypatch.delenv("MASTER_PORT")  # accelerate launch --cpu with one process
    assert harness.check_launch() == 1


def test_an_accelerator_that_does_not_join_the_launched_processes_is_a_clear_error(monkeypatch):
    import accelerate

    class Alone:  # what accelerate sets up when it does not join torchrun's processes
        num_processes, distributed_type = 1, "DistributedType.NO"

        def __init__(self, **kwargs):
            self.kwargs = kwargs

    monkeypatch.setattr(accelerate, "Accelerator", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert harness.needs_cpu_backend()
    with pytest.raises(RuntimeError, match="the launcher started 2 processes but accelerate joined 1"):
        harness.make_accelerator()


def test_the_mean_loss_over_processes():
    class TwoRanks:
        num_processes = 2

        def reduce(self, value, reduction):
            assert reduction == "mean"
            return (value + 3.0) / 2  # the other rank's loss is 3

    loss = torch.tensor(1.0)
    assert harness.loop.mean_over_processes(loss) is loss
    assert harness.loop.mean_over_processes(loss, TwoRanks()).item() == 2.0


GPT2_EQUAL_RUN = ("preset=tiny", "data.test_mrs=0", "optim.lr=1e-2", "lora.dropout=0", "+model.config.resid_pdrop=0",
                  "+model.config.embd_pdrop=0", "+model.config.attn_pdrop=0")  # no dropout: the same maths


@pytest.mark.slow
def test_gpt2_with_two_processes_writes_one_record_equal_to_one_process_with_the_global_batch(tmp_path, data_root):
    """torchrun without ACCELERATE_USE_CPU on a CPU: real DDP over gloo, rank 0 writes the one record; its step
    losses (the mean over ranks) and validation losses are the one-process run's with the same global batch."""
    script = REPO_ROOT / "GPT-2" / "train.py"
    done = torchrun(script, *GPT2_EQUAL_RUN, "train.batch_size=2", f"results_dir={tmp_path / 'two'}",
                    f"hydra.run.dir={tmp_path / 'hydra2'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), *GPT2_EQUAL_RUN, "train.batch_size=4",
                          f"results_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'hydra1'}"], cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    (two_path,) = (tmp_path / "two" / "gpt2_e2e").glob("*.json")
    (one_path,) = (tmp_path / "one" / "gpt2_e2e").glob("*.json")
    two, single = json.loads(two_path.read_text()), json.loads(one_path.read_text())
    assert two["launch"] == {"world_size": 2, "batch_per_process": 2, "grad_accum": 1, "global_batch": 4}
    assert single["launch"] == {}
    assert two["tags"] == {"preset": "tiny", "world_size": 2} and single["tags"] == {"preset": "tiny"}
    assert "_world_size-2_" in two_path.stem and "world_size" not in one_path.stem
    assert two_path.stem.split("_world_size-2_")[0] == one_path.stem.rsplit("_", 1)[0]  # same slug up to the tag
    assert [e["step"] for e in two["evals"]] == [e["step"] for e in single["evals"]] == [2, 3]
    valid_two, valid_one = ([e["valid_loss"] for e in r["evals"]] for r in (two, single))
    assert abs(valid_one[1] - valid_one[0]) > 100 * 1e-5  # the steps move the loss far more than the tolerance
    assert valid_two == pytest.approx(valid_one, abs=1e-5)
    assert [s["loss"] for s in two["steps"]] == pytest.approx([s["loss"] for s in single["steps"]], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps through the shared submitit launchers (harness/conf/hydra/launcher/)

EXPERIMENTS = ("GPT-2", "Mistral-7B", "Mix-of-Show", "Object_Generation")


def compose_hydra(experiment: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / experiment / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_the_one_shared_slurm_and_local_launchers(experiment):
    assert not (REPO_ROOT / experiment / "conf" / "hydra").exists()  # one definition, in harness/conf
    slurm = compose_hydra(experiment, "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                          "hydra.launcher.gpus_per_task=2", "hydra.launcher.timeout_min=30",
                          "hydra.launcher.array_parallelism=4").launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_task, slurm.timeout_min, slurm.array_parallelism) == ("gpu", 2, 30, 4)
    assert compose_hydra(experiment, "hydra/launcher=slurm").launcher.partition is None  # the cluster's default
    local = compose_hydra(experiment, "hydra/launcher=local").launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and local.timeout_min == 240
    callbacks = compose_hydra(experiment).callbacks
    assert callbacks.import_path._target_ == "harness.launchers.ExportImportPath"


def test_the_sweep_jobs_import_path_holds_the_entry_points_folder_and_the_repository(monkeypatch):
    from harness.launchers import ExportImportPath, import_path

    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(REPO_ROOT / "GPT-2" / "train.py"), raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert import_path() == [str(REPO_ROOT / "GPT-2"), str(REPO_ROOT), "/elsewhere"]
    ExportImportPath().on_multirun_start(config=None)
    assert os.environ["PYTHONPATH"] == os.pathsep.join(import_path())


@pytest.mark.slow
def test_an_lr_sweep_through_the_local_submitit_launcher_writes_a_record_per_job(tmp_path, data_root):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    environment.pop("PYTHONPATH", None)  # what the jobs import comes from the sweep's callback, not from pytest
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "GPT-2" / "train.py"), "-m", "preset=tiny", "optim=adamw", "data.test_mrs=0",
         "optim.lr=1e-3,1e-2", "hydra/launcher=local", f"results_dir={tmp_path / 'results'}",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "gpt2_e2e").glob("*.json"))]
    assert sorted(r["hparams"]["lr"] for r in records) == [1e-3, 1e-2]
    assert all(r["launch"] == {} and len(r["steps"]) == 3 for r in records)
    assert len(list((tmp_path / "multirun" / ".submitit").glob("*/*_0_log.out"))) == 2  # two submitit jobs


def test_the_tasks_of_a_submitit_job_are_joined_as_one_run(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that what the join exports is removed after the test
        monkeypatch.delenv(key)
    task = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
            "SUBMITIT_LOCAL_LOCALID": "1"}  # task 1 of a 2-task local job
    for key, value in task.items():
        monkeypatch.setenv(key, value)
    assert harness.check_launch() == 2
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == ("1", "1", "2")
    assert os.environ["MASTER_PORT"] and os.environ["MASTER_ADDR"]


@pytest.mark.slow
def test_a_sweep_job_with_two_tasks_is_one_two_process_run(tmp_path, data_root):
    """hydra.launcher.tasks_per_node=2: the two tasks join as one DDP run (gloo here) and write one record."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "GPT-2" / "train.py"), "-m", "preset=tiny", "optim=adamw", "data.test_mrs=0",
         "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", f"results_dir={tmp_path / 'results'}",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (path,) = (tmp_path / "results" / "gpt2_e2e").glob("*.json")
    record = json.loads(path.read_text())
    assert record["launch"]["world_size"] == 2 and record["tags"]["world_size"] == 2 and len(record["steps"]) == 2
