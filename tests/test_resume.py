"""Resumable runs: the checkpoint folder's rules (atomic saves, latest, keep, resume=true/false, config checks),
exact resumes of harness.train_loop (with and without accelerate, augmentations drawing random numbers while
batches are fetched ahead), and each experiment killed with SIGKILL after its first checkpoint, then resumed: its
record equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from _tiny import LoraDownUp
from hydra import compose, initialize_config_dir

from harness import (
    REPO_ROOT, Checkpointer, RecordLockedError, ResumableDataset, RunCheckpoints, RunRecorder, TrainerCheckpoints,
    build_optimizer, checkpoint_folder, load_module, load_records, seed_everything, train_loop,
)  # fmt: skip
from harness.checkpoint import LATEST, MANIFEST, config_difference, rng_state, set_rng_state
from harness.records import training_name


# ------------------------------------------------------------------------------------------------ the folder
def _fake_checkpoint(checkpoints: RunCheckpoints, step: int, config: dict) -> Path:
    staging = checkpoints.staging(step)
    staging.mkdir(parents=True)
    (staging / "weights.bin").write_bytes(b"x" * step)
    (staging / "config.json").write_text(json.dumps(config))
    return checkpoints.seal(staging, step)


def test_a_checkpoint_is_complete_only_once_sealed_and_latest_keep_follow(tmp_path):
    config = {"seed": 0, "train": {"steps": 10}, "checkpoint": {"every": 2}}
    checkpoints = RunCheckpoints(tmp_path / "run", every=2, keep=2, config=config)
    assert checkpoints.complete() == [] and checkpoints.resume_from is None
    for step in (2, 4, 6):
        final = _fake_checkpoint(checkpoints, step, config)
        assert final == tmp_path / "run" / f"step-{step}" and (final / MANIFEST).is_file()
        assert (tmp_path / "run" / LATEST).read_text().strip() == f"step-{step}"
    assert [s for s, _ in checkpoints.complete()] == [4, 6]  # keep=2: step-2 removed once step-6 was complete
    half = checkpoints.staging(8)  # a save killed half-way: files, no manifest
    half.mkdir()
    (half / "weights.bin").write_bytes(b"partial")
    unsealed = tmp_path / "run" / "step-10"  # and a checkpoint folder its writer never completed
    unsealed.mkdir()
    assert [s for s, _ in checkpoints.complete()] == [4, 6] and checkpoints.incomplete() == [half, unsealed]

    resumed = RunCheckpoints(tmp_path / "run", resume=True, config={**config, "checkpoint": {"every": 5}})
    assert resumed.resume_from == tmp_path / "run" / "step-6" and resumed.resumed_step == 6
    assert not half.exists() and not unsealed.exists()  # leftovers of cut-short saves are removed on resume


def test_resume_rules_name_the_problem(tmp_path):
    config = {"seed": 0, "optim": {"lr": 1e-3}, "wandb": None}
    folder = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="resume=true, but .*run' holds no complete checkpoint"):
        RunCheckpoints(folder, resume=True, config=config)
    checkpoints = RunCheckpoints(folder, every=1, config=config)
    _fake_checkpoint(checkpoints, 3, config)
    with pytest.raises(FileExistsError, match=r"checkpoints up to step 3 in '.*run': resume=true continues it, or "
                                              "remove that folder"):
        RunCheckpoints(folder, every=1, config=config)
    with pytest.raises(ValueError, match=r"another configuration \(optim.lr: 0.001 in the checkpoint, 0.01 now\)"):
        RunCheckpoints(folder, resume=True, config={**config, "optim": {"lr": 1e-2}})
    with pytest.raises(ValueError, match="written by 1 processes, this run has 2"):
        RunCheckpoints(folder, resume=True, config=config, world_size=2)
    assert RunCheckpoints(folder, resume=True, config={**config, "wandb": {"mode": "offline"}}).resume_from
    (folder / "step-3" / "weights.bin").write_bytes(b"xx")  # truncated after it was sealed
    with pytest.raises(ValueError, match="step-3 is damaged: weights.bin is 2 bytes, its manifest says 3 bytes"):
        RunCheckpoints(folder, resume=True, config=config)
    for bad, message in (({"every": -1}, "checkpoint.every must be"), ({"keep": 0}, "checkpoint.keep must be"),
                         ({"resume": "yes"}, "resume must be true, false or auto, got 'yes'")):
        with pytest.raises(ValueError, match=message):
            RunCheckpoints(tmp_path / "other", **bad)
    only_half = RunCheckpoints(tmp_path / "cut", every=1).staging(1)
    only_half.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="only an incomplete checkpoint .*: remove that folder"):
        RunCheckpoints(tmp_path / "cut", every=1)


def test_an_unwritable_checkpoint_folder_stops_the_run_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="checkpoint folder .*a_file/run' is not writable"):
        RunCheckpoints(tmp_path / "a_file" / "run", every=5)
    assert RunCheckpoints(tmp_path / "a_file" / "run").every is None  # no checkpoints: nothing to write


def test_a_sharded_run_is_refused_checkpoints_only_when_it_asks_for_them(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, process_index=0, num_processes=1,
                           is_main_process=True)
    with pytest.raises(ValueError, match="sharded by FSDP.*checkpoint.every=null"):
        Checkpointer(tmp_path / "run", accelerator=fsdp, every=2)
    assert not Checkpointer(tmp_path / "run", accelerator=fsdp).active  # no checkpoints asked for: it trains


def test_config_difference_names_the_first_differing_key():
    saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "resume": False, "checkpoint": {"every": 2}}
    assert config_difference(saved, {**saved, "resume": True, "checkpoint": {"every": 9}}) is None
    assert config_difference(saved, {**saved, "a": 1.0}) is None  # the same number
    changed = {**saved, "b": {"c": [1, 3], "d": "x"}}
    assert config_difference(saved, changed) == "b.c: [1, 2] in the checkpoint, [1, 3] now"
    assert config_difference(saved, {**saved, "a": True}) == "a: 1 in the checkpoint, True now"
    assert config_difference(saved, {**saved, "e": 0}) == "e: absent from the checkpoint's config"


def test_recorder_snapshot_round_trip(tmp_path):
    rec = RunRecorder(tmp_path, "demo", "adamw", {"lr": 1e-3}, seed=0)
    rec.log_step(1, loss=2.0, lr=1e-3, time_s=0.1)
    rec.log_metrics(1, valid_loss=1.5)
    rec.record.final_metrics["diverged_at_step"] = 4
    later = RunRecorder(tmp_path, "demo", "adamw", {"lr": 1e-3}, seed=0)
    later.load_state_dict(rec.state_dict())
    assert later.record.steps == rec.record.steps and later.record.evals == rec.record.evals
    assert later.record.final_metrics == {"diverged_at_step": 4} and later.record.created == rec.record.created
    mismatch = r"record is of run 'adamw_lr0.001_seed0_\w{8}', not 'adamw_lr0.001_seed1_\w{8}'"
    with pytest.raises(ValueError, match=mismatch):
        RunRecorder(tmp_path, "demo", "adamw", {"lr": 1e-3}, seed=1).load_state_dict(rec.state_dict())
    assert checkpoint_folder(rec) == tmp_path / "demo" / "checkpoints" / rec.record.run_name


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    set_rng_state(state)
    again = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and first[2] == again[2]
    with pytest.raises(ValueError, match="covers 2 CUDA devices, this process sees 0"):
        set_rng_state({**state, "cuda": [torch.zeros(1), torch.zeros(1)]})


@pytest.mark.parametrize("folder,full,presets", [
    ("GPT-2", 1000, ["tiny", "smollm2_cpu"]), ("Mistral-7B", 500, ["minilm_sst2"]),
    ("Object_Generation", 1000, ["tiny"]), ("Mix-of-Show", 25, ["tiny"]),
])
def test_checkpoints_are_on_at_full_scale_and_off_in_the_cpu_presets(folder, full, presets):
    if folder == "Mistral-7B":  # its task, table and tuned groups are registered in code
        load_module(REPO_ROOT / folder / "config_groups.py").register_config_groups()
    with initialize_config_dir(config_dir=str(REPO_ROOT / folder / "conf"), version_base="1.3"):
        default = compose(config_name="config")
        assert (default.checkpoint.every, default.checkpoint.keep, default.resume) == (full, 2, False)
        for preset in presets:
            cfg = compose(config_name="config", overrides=[f"preset={preset}"])
            assert cfg.checkpoint.every is None and cfg.checkpoint.keep == 2 and cfg.resume is False


def test_trainer_checkpoints_fall_on_logging_steps(tmp_path):
    checkpoints = TrainerCheckpoints(tmp_path / "run", every=4)
    assert checkpoints.training_arguments(2, "scratch") == {
        "save_strategy": "steps", "save_steps": 4, "save_total_limit": None, "output_dir": str(tmp_path / "run")}
    assert TrainerCheckpoints(tmp_path / "off").training_arguments(2, "scratch") == {
        "save_strategy": "no", "output_dir": "scratch"}
    with pytest.raises(ValueError, match="checkpoint.every=4 must be a multiple of train.logging_steps=3"):
        checkpoints.training_arguments(3, "scratch")


# ------------------------------------------------------------------------------------------------ train_loop
class Augmented(torch.utils.data.Dataset):
    """Items drawn with Python's and torch's global generators while fetched (like image augmentations)."""

    def __init__(self, n: int = 10):
        self.x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] * (1 + random.random()) + 0.1 * torch.rand(6), torch.tensor(i % 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.adapted = LoraDownUp(6, 6, 3)  # a frozen base layer with a LoRA pair
        self.head, self.drop = nn.Linear(6, 2), nn.Dropout(0.3)

    def forward(self, x):
        return self.head(self.drop(self.adapted(x)))


class Interrupt(Exception):
    """Stands for a kill: the process stops between two checkpoints."""


def _loop_run(folder, *, accelerate, generator, resume=False, every=3, stop_at=None, epochs=4, max_steps=None):
    """A fresh process's worth of objects (seeded), trained by train_loop with a Checkpointer."""
    seed_everything(0)
    model = Net()
    optimizer = build_optimizer(model, "scaled_adamw", lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    loader = torch.utils.data.DataLoader(ResumableDataset(Augmented()), batch_size=3, shuffle=True,
                                         generator=torch.Generator().manual_seed(5) if generator else None)
    accelerator = None
    if accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rec = RunRecorder(folder, "demo", "scaled_adamw", {"lr": 1e-2}, seed=0)
    best = {"loss": float("inf")}
    checkpointer = Checkpointer(folder / "ckpt", every=every, resume=resume, accelerator=accelerator,
                                config={"every": every})
    checkpointer.register(best=best)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise Interrupt
        x, y = batch
        return nn.functional.cross_entropy(m(x), y)

    def evaluate(step):
        best["loss"] = min(best["loss"], step / 10)
        return {"best": best["loss"]}

    losses = train_loop(model, optimizer, loader, loss_fn, scheduler=scheduler, epochs=epochs, max_steps=max_steps,
                        accelerator=accelerator, recorder=rec, eval_fn=evaluate, eval_every=2, progress=False,
                        checkpointer=checkpointer)
    return losses, rec, [p.detach().clone() for p in model.parameters()], random.random(), torch.rand(1)


@pytest.mark.parametrize("accelerate,generator", [(True, False), (True, True), (False, True)],
                         ids=["accelerate-global-rng", "accelerate-seeded-loader", "plain-seeded-loader"])
@pytest.mark.parametrize("stop_at", [5, 8, 13])  # after the checkpoint at 3 (mid-epoch), 6 (mid), 12 (epoch end)
def test_train_loop_resumes_exactly(tmp_path, accelerate, generator, stop_at):
    reference = _loop_run(tmp_path / "a", accelerate=accelerate, generator=generator)
    with pytest.raises(Interrupt):
        _loop_run(tmp_path / "b", accelerate=accelerate, generator=generator, stop_at=stop_at)
    resumed = _loop_run(tmp_path / "b", accelerate=accelerate, generator=generator, resume=True)
    assert resumed[0] == reference[0] and len(reference[0]) == 16  # 4 epochs of 4 batches (the last one short)
    assert [(s["step"], s["loss"], s["lr"]) for s in resumed[1].record.steps] == [
        (s["step"], s["loss"], s["lr"]) for s in reference[1].record.steps]
    assert resumed[1].record.evals == reference[1].record.evals
    assert all(torch.equal(p, q) for p, q in zip(resumed[2], reference[2]))
    assert resumed[3] == reference[3] and torch.equal(resumed[4], reference[4])  # the RNG after training too
    steps = [s for s, _ in Checkpointer(tmp_path / "b" / "ckpt", resume=True, config={"every": 3}).complete()]
    assert steps == [15, 16]  # keep=2: the checkpoint at 15 and the final one


def test_the_checkpoint_holds_the_trainable_parameters_only(tmp_path):
    from safetensors.torch import load_file

    _loop_run(tmp_path, accelerate=True, generator=False, every=4, epochs=1)
    saved = load_file(tmp_path / "ckpt" / "step-4" / "model.safetensors")
    assert sorted(saved) == ["adapted.lora_down.weight", "adapted.lora_up.weight", "head.bias", "head.weight"]
    files = json.loads((tmp_path / "ckpt" / "step-4" / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "loop_state_0.pt", "extra.pt", "record.json",
            "config.json"} <= set(files)


def test_a_resumed_finished_run_trains_no_more(tmp_path):
    reference = _loop_run(tmp_path, accelerate=False, generator=True, max_steps=5)
    again = _loop_run(tmp_path, accelerate=False, generator=True, max_steps=5, resume=True)
    assert again[0] == reference[0] and len(again[0]) == 5 and again[3] == reference[3]


def test_checkpoints_need_a_resumable_loader(tmp_path):
    model = Net()
    optimizer = build_optimizer(model, "adamw", lr=1e-2)
    checkpointer = Checkpointer(tmp_path, every=2)
    with pytest.raises(TypeError, match=r"built over harness.ResumableDataset\(dataset\), got a DataLoader over "
                                        "Augmented"):
        train_loop(model, optimizer, torch.utils.data.DataLoader(Augmented(), batch_size=2), lambda m, b: m(b[0]).sum(),
                   checkpointer=checkpointer, progress=False)
    loader = torch.utils.data.DataLoader(ResumableDataset(Augmented()), batch_size=2, num_workers=1)
    with pytest.raises(ValueError, match="num_workers=0"):
        train_loop(model, optimizer, loader, lambda m, b: m(b[0]).sum(), checkpointer=checkpointer, progress=False)


# ------------------------------------------------------------------------------------------------ killed runs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _run(script: Path, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(script), *overrides], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_killed_after_first_checkpoint(script: Path, *overrides: str, checkpoints: Path, cwd: Path) -> None:
    """Start a run and SIGKILL it from outside as soon as its first checkpoint is complete (``latest`` exists)."""
    log = cwd / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(script), *overrides], cwd=cwd, env=ENV, stdout=out, stderr=out)
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob(f"*/{LATEST}")):
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it was killed:\n{log.read_text()[-3000:]}"


def _same_run(resumed, reference, ignore_metrics=()) -> None:
    """Per-step loss and lr, evaluations (but their wall-clock times) and final metrics equal (exactly: CPU,
    float32, one thread)."""
    assert [(s["step"], s["loss"], s["lr"]) for s in resumed.steps] == [
        (s["step"], s["loss"], s["lr"]) for s in reference.steps]

    def untimed(evals):
        return [{k: v for k, v in e.items() if not k.endswith(("_runtime", "_per_second"))} for e in evals]

    assert untimed(resumed.evals) == untimed(reference.evals)
    drop = set(ignore_metrics)
    assert {k: v for k, v in resumed.final_metrics.items() if k not in drop} == {
        k: v for k, v in reference.final_metrics.items() if k not in drop}


def _resumed_from(stdout: str) -> int:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("resuming from ")]
    return int(line.rsplit("(step ", 1)[1].rstrip(")"))


@pytest.mark.slow
def test_gpt2_killed_after_its_first_checkpoint_resumes_to_the_same_record(tmp_path, data_root):
    script = REPO_ROOT / "GPT-2" / "train.py"
    common = ["preset=tiny", "optim=scaled_adamw", "data.test_mrs=0", "train.max_steps=null", "train.epochs=2",
              "train.eval_every=2", "checkpoint.every=3", f"hydra.run.dir={tmp_path / 'hydra'}"]  # 8 steps, 4 an epoch
    _run(script, *common, f"results_dir={tmp_path / 'reference'}", cwd=tmp_path)
    killed = [*common, f"results_dir={tmp_path / 'killed'}"]
    checkpoints = tmp_path / "killed" / "gpt2_e2e" / "checkpoints"
    _run_killed_after_first_checkpoint(script, *killed, checkpoints=checkpoints, cwd=tmp_path)
    [left] = load_records(tmp_path / "killed", "gpt2_e2e")  # the killed run's record says how far it got
    assert left.status == "running" and [s["step"] for s in left.steps][:3] == [1, 2, 3]
    gpt2_train = load_module(script, "gpt2_train")
    with initialize_config_dir(config_dir=str(script.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=killed[:-1] + [f"results_dir={tmp_path / 'killed'}"])
    with pytest.raises(RecordLockedError, match="continue it with resume=true"):  # a fresh start after the kill
        gpt2_train.main(cfg)
    done = _run(script, *killed, "resume=true", cwd=tmp_path)
    assert _resumed_from(done.stdout) in (3, 6)
    [reference] = load_records(tmp_path / "reference", "gpt2_e2e")
    [resumed] = load_records(tmp_path / "killed", "gpt2_e2e")
    _same_run(resumed, reference)
    assert len(resumed.steps) == 8 and [e["step"] for e in resumed.evals] == [2, 4, 6, 8]
    folder = checkpoints / training_name(resumed, gpt2_train.AFTER_TRAINING)  # decoding is not part of it
    assert [s for s, _ in Checkpointer(folder, resume=True, config=resumed.config).complete()] == [6, 8]


@pytest.mark.slow
def test_object_generation_killed_after_its_first_checkpoint_resumes_to_the_same_record(tmp_path, data_root):
    """Through accelerate's save_state/load_state; random crops and colour jitter drawn while batches are fetched
    ahead, the vase's 6 images in batches of 1: checkpoints mid-epoch and at an epoch's end."""
    script = REPO_ROOT / "Object_Generation" / "train.py"
    common = ["preset=tiny", "optim=scaled_adamw", "train.steps=14", "checkpoint.every=3", "sample.steps=2",
              "sample.seeds=[0,1]", f"hydra.run.dir={tmp_path / 'hydra'}"]
    _run(script, *common, f"results_dir={tmp_path / 'reference'}", cwd=tmp_path)
    killed = [*common, f"results_dir={tmp_path / 'killed'}"]
    checkpoints = tmp_path / "killed" / "object_generation" / "checkpoints"
    _run_killed_after_first_checkpoint(script, *killed, checkpoints=checkpoints, cwd=tmp_path)
    done = _run(script, *killed, "resume=true", cwd=tmp_path)
    assert _resumed_from(done.stdout) in (3, 6, 9, 12)
    [reference] = load_records(tmp_path / "reference", "object_generation")
    [resumed] = load_records(tmp_path / "killed", "object_generation")
    _same_run(resumed, reference, ignore_metrics=("sample_time_s",))  # wall-clock
    assert resumed.final_metrics["steps_done"] == 14 and resumed.final_metrics["token_embedding_delta"] > 0


def test_which_embedding_rows_learn_survives_a_resume():
    """Mix-of-Show freezes its new token rows once their norm reaches a threshold: a resumed run keeps them frozen."""
    from harness import diffusion as D

    def make():
        torch.manual_seed(0)
        embedding = nn.Embedding(5, 4)
        optimizer = torch.optim.SGD(embedding.parameters(), lr=1.0)
        return embedding, optimizer, D.keep_original_embedding_rows(optimizer, embedding, [3], freeze_at_norm=0.5)

    def step(embedding, optimizer):
        embedding(torch.tensor([3, 1])).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    embedding, optimizer, guard = make()
    step(embedding, optimizer)  # row 3 moves, and its norm (> 0.5) freezes it
    frozen, state = embedding.weight.detach().clone(), guard.state_dict()
    for restore in (True, False):
        embedding, optimizer, guard = make()
        with torch.no_grad():
            embedding.weight.copy_(frozen)  # the trainable parameters come back first
        if restore:
            guard.load_state_dict(state)
        step(embedding, optimizer)
        assert torch.equal(embedding.weight, frozen) == restore


@pytest.mark.slow
def test_mistral_trainer_killed_after_its_first_checkpoint_resumes_to_the_same_record(tmp_path):
    """Through the Trainer's own checkpoints (save_strategy=steps, resume_from_checkpoint): a tiny Mistral with
    LoRA and the scaled optimizer, 4 training sentences in batches of 2, so 12 epochs in 24 steps."""
    from test_mistral_data import write_glue
    from test_mistral_train import WORDS

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    model_dir, glue = tmp_path / "tiny_mistral", write_glue(tmp_path / "glue")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(model_dir)
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     bos_token_id=1, eos_token_id=2)).save_pretrained(model_dir)
    script = REPO_ROOT / "Mistral-7B" / "train.py"
    common = [f"model.name_or_path={model_dir}", "quantize=false", f"data.root={glue}", "task=rte",
              "optim=scaled_adamw", "optim.lr=1e-2", "train.max_steps=24", "train.batch_size=2",
              "train.eval_batch_size=4", "train.logging_steps=2", "train.use_cpu=true", "checkpoint.every=4",
              f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    _run(script, *common, f"results_dir={tmp_path / 'reference'}", cwd=tmp_path)
    killed = [*common, f"results_dir={tmp_path / 'killed'}"]
    checkpoints = tmp_path / "killed" / "glue" / "checkpoints"
    _run_killed_after_first_checkpoint(script, *killed, checkpoints=checkpoints, cwd=tmp_path)
    done = _run(script, *killed, "resume=true", cwd=tmp_path)
    assert _resumed_from(done.stdout) in range(4, 24, 4)
    [reference] = load_records(tmp_path / "reference", "glue")
    [resumed] = load_records(tmp_path / "killed", "glue")
    _same_run(resumed, reference, ignore_metrics=("train_runtime_s", "train_loss"))
    assert resumed.final_metrics["train_loss"] == pytest.approx(reference.final_metrics["train_loss"], rel=1e-12)
    assert [s["step"] for s in resumed.steps] == list(range(2, 25, 2)) and resumed.final_metrics["steps"] == 24
    folder = checkpoints / resumed.run_name
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint-20", "checkpoint-24"]
    assert (folder / LATEST).read_text().strip() == "checkpoint-24"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "record.json", MANIFEST} <= {p.name for p in (folder / "checkpoint-24").iterdir()}


DDP_SCRIPT = """
import json, sys
import torch
from test_resume import Interrupt, _loop_run

root, stop_at = sys.argv[1], int(sys.argv[2])
from pathlib import Path
reference = _loop_run(Path(root) / "a", accelerate=True, generator=False)
try:
    _loop_run(Path(root) / "b", accelerate=True, generator=False, stop_at=stop_at)
    raise SystemExit("the run was not interrupted")
except Interrupt:
    pass
resumed = _loop_run(Path(root) / "b", accelerate=True, generator=False, resume=True)
rank = torch.distributed.get_rank()
same = all(torch.equal(p, q) for p, q in zip(resumed[2], reference[2]))
Path(root, f"rank{rank}.json").write_text(json.dumps({"reference": reference[0], "resumed": resumed[0],
                                                     "params": same, "rng": resumed[3] == reference[3]}))
torch.distributed.barrier()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 7])  # after the checkpoint at 3 (mid-epoch) and at 6 (an epoch's end)
def test_two_process_train_loop_resumes_exactly(tmp_path, stop_at):
    """DDP (gloo) through accelerate: each process's RNG and data position in its own loop state, the sampler's
    generator that accelerate synchronises across processes, the model and optimizer saved once."""
    import socket

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(script), str(tmp_path), str(stop_at)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["resumed"] == result["reference"] and len(result["reference"]) == 8  # 2 batches an epoch
        assert result["params"] and result["rng"]
    manifest = json.loads((tmp_path / "b" / "ckpt" / "step-8" / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and {"loop_state_0.pt", "loop_state_1.pt"} <= set(manifest["files"])
