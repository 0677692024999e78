"""harness: the results schema round trip, the shared training loop, seeding, paths, loading an experiment's
module by file path, and the optimizers behind harness.build_optimizer (the paper's four and the peers)."""

import json
import random
import sys

import numpy as np
import pytest
import torch

import core
from _tiny import MixedModel, tiny_peft_llama
from harness import (
    ALL_OPTIMIZERS, HPARAMS, OPTIMIZER_NAMES, PEER_NAMES, REPO_ROOT, RunRecorder, TrainingDiverged, build_optimizer,
    default_run_name, load_module, load_records, require_path, seed_everything, train_loop,
)  # fmt: skip
from harness.resolvers import package_dir

X = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 2
BATCHES = [(X[:8], Y[:8]), (X[8:], Y[8:])]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def test_recorder_round_trip(tmp_path):
    rec = RunRecorder(tmp_path, "demo", "scaled_adamw", {"lr": 8e-4, "betas": (0.7, 0.8)}, seed=3,
                      config={"a": {"b": 1}}, tags={"preset": "tiny"})
    rec.log_step(1, loss=2.5, lr=8e-4, time_s=0.2)
    rec.log_step(2, loss=float("nan"), lr=8e-4, time_s=0.4)
    rec.log_step(3, loss=1.5, lr=8e-4, time_s=0.3)
    rec.log_metrics(3, accuracy=0.5)
    path = rec.finish({"BLEU": 0.61})
    assert path == tmp_path / "demo" / f"scaled_adamw_lr0.0008_seed3_preset-tiny_{rec.record.config_hash}.json"
    (record,) = load_records(tmp_path, "demo")
    assert record.status == "done" and record.run_name == path.stem and len(record.config_hash) == 8
    assert record.hparams == {"lr": 8e-4, "betas": [0.7, 0.8]}
    assert record.final_metrics == {"BLEU": 0.61} and record.step_time_s == pytest.approx(0.3)
    assert record.steps[1]["loss"] is None and record.evals == [{"step": 3, "accuracy": 0.5}]
    assert record.hardware["torch"] == torch.__version__ and record.tags == {"preset": "tiny"}


def test_default_run_name_carries_reg_so_a_reg_sweep_keeps_every_run(tmp_path):
    names = {
        RunRecorder(tmp_path, "demo", "scaled_gd", {"lr": "1e-3", "reg": reg}, seed=0, tags={"kappa": 10}).path.stem
        for reg in (0.0, 1e-6, 1e-6)
    }
    assert {name.rsplit("_", 1)[0] for name in names} == {"scaled_gd_lr0.001_reg0_seed0_kappa-10",
                                                          "scaled_gd_lr0.001_reg1e-06_seed0_kappa-10"}
    assert len(names) == 2
    assert default_run_name("sgd", {"lr": 0.1}, 1, {}).startswith("sgd_lr0.1_seed1_")


def test_load_records_rejects_foreign_json(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"x.json: not a run record \(missing \['experiment'"):
        load_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="results folder '.*nowhere' does not exist"):
        load_records(tmp_path / "nowhere")


def test_train_loop_trains_and_records(tmp_path):
    seed_everything(0)
    model = MixedModel()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rec = RunRecorder(tmp_path, "demo", "scaled_adamw", {"lr": 1e-2}, seed=0)
    losses = train_loop(model, opt, BATCHES, loss_fn, scheduler=sched, epochs=10, recorder=rec, progress=False,
                        eval_fn=lambda step: {"loss_full": loss_fn(model, (X, Y)).item()}, eval_every=5)
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert len(rec.record.steps) == 20 and len(rec.record.evals) == 4
    assert all(s["opt_time_s"] <= s["time_s"] for s in rec.record.steps)
    assert train_loop(model, opt, BATCHES, loss_fn, max_steps=3, epochs=5, progress=False).__len__() == 3


def test_train_loop_divergence_raises_or_is_recorded(tmp_path):
    model = MixedModel()
    opt = build_optimizer(model, "sgd", lr=1e-2)
    bad = [(X[:8] * float("inf"), Y[:8])]
    with pytest.raises(TrainingDiverged, match="diverged at step 1"):
        train_loop(model, opt, bad, loss_fn, progress=False)
    rec = RunRecorder(tmp_path, "demo", "sgd", {"lr": 1e-2}, seed=0)
    with pytest.warns(UserWarning, match="training diverged at step 1"):
        losses = train_loop(model, opt, bad, loss_fn, progress=False, recorder=rec, stop_on_divergence=True)
    assert losses == [] and rec.record.final_metrics["diverged_at_step"] == 1


def test_seeding_and_paths(tmp_path):
    seed_everything(5)
    a = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(5)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(FileNotFoundError, match="E2E data folder not found: '.*missing' does not exist"):
        require_path(tmp_path / "missing", "E2E data folder")
    assert package_dir("harness") == str(REPO_ROOT / "harness")
    with pytest.raises(ModuleNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        package_dir("no_such_pkg_xyz")


def test_load_module_imports_by_path_with_sibling_imports(tmp_path):
    folder = tmp_path / "some-experiment"  # a hyphenated folder: not a package
    folder.mkdir()
    (folder / "helper_xyz.py").write_text("VALUE = 41\n")
    (folder / "train.py").write_text("from helper_xyz import VALUE\nANSWER = VALUE + 1\n")
    try:
        train = load_module(folder / "train.py", "some_experiment_train")
        assert train.ANSWER == 42 and sys.modules["helper_xyz"].__file__ == str(folder / "helper_xyz.py")
        assert load_module(folder / "train.py", "some_experiment_train") is train  # loaded once
        with pytest.raises(ValueError, match="module name 'some_experiment_train' is already taken"):
            load_module(folder / "helper_xyz.py", "some_experiment_train")
        (folder / "broken.py").write_text("raise RuntimeError('broken on import')\n")
        with pytest.raises(RuntimeError, match="broken on import"):
            load_module(folder / "broken.py", "some_experiment_broken")
        assert "some_experiment_broken" not in sys.modules
    finally:
        for name in ("some_experiment_train", "helper_xyz"):
            sys.modules.pop(name, None)
        sys.path.remove(str(folder))
    with pytest.raises(FileNotFoundError, match="module file '.*nowhere.py' does not exist"):
        load_module(tmp_path / "nowhere.py")
    assert load_module("GPT-2/e2e_data.py").__file__ == str(REPO_ROOT / "GPT-2" / "e2e_data.py")  # repo-relative


def test_build_optimizer_names_and_dispatch():
    assert OPTIMIZER_NAMES == ("sgd", "scaled_gd", "adamw", "scaled_adamw")
    assert ALL_OPTIMIZERS == OPTIMIZER_NAMES + PEER_NAMES and set(HPARAMS) == set(ALL_OPTIMIZERS)
    model = MixedModel()
    opt = build_optimizer(model, "scaled_gd", lr=0.1, reg=1e-4, group_overrides={"head": {"lr": 0.5}})
    assert isinstance(opt, core.ScaledGD) and sorted(g["lr"] for g in opt.param_groups) == [0.1, 0.5]
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; expected one of \['sgd', .*'lora_rite'\]"):
        build_optimizer(model, "lion", lr=0.1)
    with pytest.raises(ValueError, match="group_overrides are not supported for the peer optimizer 'loraplus'"):
        build_optimizer(model, "loraplus", lr=0.1, group_overrides={"head": {"lr": 0.5}})
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['reg'\] for optimizer 'lora_rite'"):
        build_optimizer(model, "lora_rite", lr=0.1, reg=1.0)


@pytest.mark.parametrize(
    "name, hparams",
    [("peft_riemannian", {"lr": 1e-3, "reg": 1e-4}), ("loraplus", {"lr": 1e-3, "loraplus_lr_ratio": 8.0}),
     ("lora_rite", {"lr": 1e-3})],
)
def test_peer_optimizers_train_a_peft_model(name, hparams):
    model = tiny_peft_llama(targets=("q_proj", "v_proj"), modules_to_save=["lm_head"])
    opt = build_optimizer(model, name, **hparams)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert set(moved) == set(start)  # LoRA factors and the plain head all trained


def test_lora_rite_gives_the_plain_parameters_torch_adamw():
    """LoRA-RITE pairs the LoRA factors; the other trainable parameters (here PEFT's trainable copy of lm_head) get
    AdamW in the same optimizer: step for step what torch.optim.AdamW does with the same gradients."""
    hparams = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    model = tiny_peft_llama(targets=("q_proj", "v_proj"), modules_to_save=["lm_head"])
    opt = build_optimizer(model, "lora_rite", **hparams)
    paired = {id(t) for pair in core.find_lora_pairs(model) for t in (pair.A, pair.B)}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    assert plain and len(paired) == 2 * 2 * 2  # q and v of two layers, A and B
    twins = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    twin_opt = torch.optim.AdamW(twins, **hparams)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        opt.zero_grad()
        twin_opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        for p, twin in zip(plain, twins):
            twin.grad = p.grad.clone()
        opt.step()
        twin_opt.step()
    for p, twin in zip(plain, twins):
        torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)
