"""Faults a user meets, each a clear error before any work (or the right behaviour): settings checked before
training in all four experiments, out-of-range numbers refused, a fix to a post-training setting that resumes the
finished training, a resume that names what changed, the optimizer object behaving like a torch optimizer."""

import copy
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from core import ScaledAdamW, UnheldGradientWarning, build_optimizer, trainer_optimizer
from harness import REPO_ROOT, RunCheckpoints, load_module, load_records, train_loop
from harness.diffusion import runs as D

GPT2 = load_module(REPO_ROOT / "GPT-2" / "train.py", "gpt2_train")
MISTRAL = load_module(REPO_ROOT / "Mistral-7B" / "train.py", "mistral_train")


def _compose(folder: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / folder / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# ------------------------------------------------------------------ every setting checked before anything is loaded
@pytest.mark.parametrize("override, message", [
    ("decode.num_beams=0", r"decode.num_beams=0: must be an integer >= 1"),
    ("decode.max_new_tokens=-1", r"decode.max_new_tokens=-1: must be an integer >= 1"),
    ("train.grad_clip=-1", r"train.grad_clip=-1: must be a finite number > 0, or null \(no clipping\)"),
    ("train.max_steps=-5", r"train.max_steps=-5: must be an integer >= 1, or null \(all epochs\)"),
    ("train.max_steps=0", r"train.max_steps=0: must be"),
    ("train.epochs=0", r"train.epochs=0: must be an integer >= 1"),
    ("train.warmup_steps=-3", r"train.warmup_steps=-3: must be an integer >= 0"),
    ("train.eval_every=-1", r"train.eval_every=-1: must be an integer >= 1, or null \(once per epoch\)"),
    ("seed=abc", r"seed='abc': must be an integer"),
    ("data.test_mrs=-2", r"data.test_mrs=-2: must be an integer >= 0"),
])  # fmt: skip
def test_gpt2_settings_are_checked_before_anything_is_loaded(override, message):
    with pytest.raises(ValueError, match=message):
        GPT2.check_config(_compose("GPT-2", "preset=tiny", override))


def test_gpt2_lists_every_bad_setting_at_once():
    with pytest.raises(ValueError, match=r"bad settings: train.grad_clip=-1: .*; decode.num_beams=0: "):
        GPT2.check_config(_compose("GPT-2", "preset=tiny", "decode.num_beams=0", "train.grad_clip=-1"))
    GPT2.check_config(_compose("GPT-2", "preset=tiny"))  # the shipped configs pass
    GPT2.check_config(_compose("GPT-2"))


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", r"train.max_steps=0: must be an integer >= 1 \(or -1\)"),
    ("train.epochs=0", r"train.epochs=0: must be a finite number > 0"),
    ("train.max_grad_norm=-1", r"train.max_grad_norm=-1: must be a finite number > 0"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio=1.5: must be a finite number >= 0 and <= 0.999999"),
    ("train.eval_steps=0", r"train.eval_steps=0: must be an integer >= 1"),
    ("seed=abc", r"seed='abc': must be an integer"),
])  # fmt: skip
def test_sst2_settings_are_checked_before_anything_is_loaded(tmp_path, override, message):
    cfg = _compose("Mistral-7B", "preset=minilm_sst2", "optim=adamw", f"results_dir={tmp_path}", override)
    with pytest.raises(ValueError, match=message):
        MISTRAL.preflight(cfg)


@pytest.mark.parametrize("folder", ["Object_Generation", "Mix-of-Show"])
@pytest.mark.parametrize("override, message", [
    ("sample.sampler=eulr", r"sample.sampler='eulr': must be one of \['ddim', 'ddpm', 'euler_ancestral'\]"),
    ("sample.seeds=[]", r"sample.seeds=\[\]: must be a non-empty list of integers"),
    ("sample.steps=0", r"sample.steps=0: must be an integer >= 1"),
    ("train.steps=0", r"train.steps=0: must be an integer >= 1"),
    ("train.grad_clip=-1", r"train.grad_clip=-1: must be a finite number > 0"),
    ("seed=abc", r"seed='abc': must be an integer"),
])  # fmt: skip
def test_diffusion_settings_are_checked_before_anything_is_loaded(tmp_path, folder, override, message):
    cfg = _compose(folder, "preset=tiny", f"results_dir={tmp_path}", override)
    with pytest.raises(ValueError, match=message):
        D.preflight(cfg, "experiment")
    assert not (tmp_path / "experiment").exists()  # nothing written


def test_theory_settings_are_checked_before_any_run(tmp_path):
    from main_figures.theory import CONF_DIR, run

    for override, message in (("problem.seed=abc", r"problem.seed='abc': must be an integer"),
                               ("max_iters=0", r"max_iters=0: must be an integer >= 1"),
                               ("sensitivity.perturbations=-1", r"sensitivity.perturbations=-1: must be")):  # fmt: skip
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="theory", overrides=[f"results_dir={tmp_path}", override])
        with pytest.raises(ValueError, match=message):
            run(cfg)
    assert not (tmp_path / "theory").exists()


def test_the_loop_refuses_numbers_that_would_train_silently_wrong():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.ones(1, 2)]
    loss = lambda m, b: m(b).sum()  # noqa: E731
    for kwargs, message in (({"grad_clip": -1.0}, "grad_clip must be a number > 0 or None"),
                            ({"max_steps": 0}, "max_steps must be an integer >= 1 or None"),
                            ({"max_steps": -5}, "max_steps must be"), ({"epochs": 0}, "epochs must be an integer >= 1"),
                            ({"eval_every": -1}, "eval_every must be an integer >= 1 or None")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            train_loop(model, optimizer, batches, loss, progress=False, **kwargs)
    before = model.weight.detach().clone()
    train_loop(model, optimizer, batches, loss, progress=False, grad_clip=1.0)
    assert not torch.equal(before, model.weight)


# ---------------------------------------------------- a fix after training resumes the finished training
def _run(script, *overrides, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    return proc


@pytest.mark.slow
def test_a_decoding_fix_resumes_the_finished_training(tmp_path, data_root):
    """The training of a run with one decoding setting is the training of the run with another: resume=true with
    only decode.* changed continues from the finished training's checkpoint and decodes again (README: Resumable
    runs)."""
    script = REPO_ROOT / "GPT-2" / "train.py"
    common = ["preset=tiny", "optim=scaled_adamw", "checkpoint.every=2", f"results_dir={tmp_path}",
              f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    first = _run(script, *common, "decode.num_beams=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(script, *common, "decode.num_beams=2", "resume=true", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "(step 3)" in second.stdout
    one, two = sorted(load_records(tmp_path, "gpt2_e2e"), key=lambda r: r.config["decode"]["num_beams"])
    assert one.run_name != two.run_name  # two results: the decoding is part of a run's identity
    assert [s["loss"] for s in two.steps] == [s["loss"] for s in one.steps]  # the same training, not redone
    assert two.final_metrics["best_step"] == one.final_metrics["best_step"] and "BLEU" in two.final_metrics
    assert len(list((tmp_path / "gpt2_e2e" / "checkpoints").iterdir())) == 1  # one training, one folder


# ----------------------------------------------------------------- a resume that finds nothing names what changed
def test_resume_names_the_keys_that_differ_from_a_sibling_run_with_checkpoints(tmp_path):
    config = {"optim": {"name": "adamw", "lr": 1e-3}, "train": {"batch_size": 4}, "seed": 0}
    old = RunCheckpoints(tmp_path / "adamw_lr0.001_seed0_aaaaaaaa", every=1, config=config)
    staging = old.staging(5)
    staging.mkdir(parents=True)
    old.write_run_files(staging)
    old.seal(staging, 5)
    changed = {**config, "train": {"batch_size": 8}}
    with pytest.raises(FileNotFoundError) as caught:
        RunCheckpoints(tmp_path / "adamw_lr0.001_seed0_bbbbbbbb", resume=True, config=changed)
    message = str(caught.value)
    assert "adamw_lr0.001_seed0_aaaaaaaa" in message and "train.batch_size: 4 -> 8" in message
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint of this run$"):  # no sibling: as before
        RunCheckpoints(tmp_path / "sgd_lr0.1_seed0_cccccccc", resume=True, config=changed)


# ------------------------------------------------------------------- the optimizer behaves like a torch optimizer
class _LoraLinear(nn.Module):
    """A PEFT-shaped LoRA layer: a frozen base and ``lora_A`` / ``lora_B`` of the adapter ``default``."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(4, 3).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class _Lora(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = _LoraLinear()
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.layer(x))


def _step(model, optimizer):
    optimizer.zero_grad()
    model(torch.ones(5, 4)).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["scaled_gd", "scaled_adamw", "adamw"])
def test_pickle_and_deepcopy_round_trip_and_step_alike(name):
    torch.manual_seed(0)
    model = _Lora()
    optimizer = build_optimizer(model, name, lr=1e-2)
    _step(model, optimizer)
    twin = copy.deepcopy((model, optimizer))
    pickled = pickle.loads(pickle.dumps((model, optimizer)))
    for m, o in ((model, optimizer), twin, pickled):
        _step(m, o)
    for m, _ in (twin, pickled):
        for p, q in zip(model.parameters(), m.parameters()):
            assert torch.equal(p, q)
    pickled[1].load_state_dict(optimizer.state_dict())  # and loads a state


def test_unknown_keys_in_a_parameter_group_are_refused():
    model = _Lora()
    pairs = core_pairs(model)
    with pytest.raises(ValueError, match=r"parameter group 0 has unknown key\(s\) \['lrr'\]"):
        ScaledAdamW([{"lora_pairs": pairs, "lrr": 5.0}], lr=1e-3)
    optimizer = ScaledAdamW([{"lora_pairs": pairs}], lr=1e-3)
    with pytest.raises(ValueError, match=r"parameter group 1 has unknown key\(s\) \['lrr'\]"):
        optimizer.add_param_group({"params": list(model.head.parameters()), "lrr": 5.0})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": list(model.head.parameters()), "lr": 5.0, "name": "head"})


def core_pairs(model):
    from core import find_lora_pairs

    return find_lora_pairs(model)


def test_a_state_saved_before_the_variant_existed_loads_as_the_gradient_variant():
    model = _Lora()
    optimizer = build_optimizer(model, "scaled_adamw", lr=1e-3)
    _step(model, optimizer)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        del group["variant"], group["fused"]
    fresh = build_optimizer(model, "scaled_adamw", lr=1e-3, variant="update")
    fresh.load_state_dict(state)
    assert all(group["variant"] == "gradient" for group in fresh.param_groups)
    del state["param_groups"][0]["betas"]  # anything else missing is still refused, by name
    with pytest.raises(ValueError, match=r"lacks the hyperparameter\(s\) \['betas', 'fused', 'variant'\]"):
        build_optimizer(model, "scaled_adamw", lr=1e-3).load_state_dict(state)


def test_a_step_on_the_meta_device_is_a_clear_error():
    model = _Lora().to("meta")
    optimizer = build_optimizer(model, "scaled_adamw", lr=1e-3)
    with pytest.raises(ValueError, match="is on the meta device.*materialise the model"):
        optimizer.step()


def test_gradients_of_parameters_the_optimizer_does_not_hold_are_warned_of_once():
    model = _Lora()
    model.head.requires_grad_(False)
    optimizer = build_optimizer(model, "scaled_adamw", lr=1e-3)
    model.head.requires_grad_(True)  # unfrozen after the optimizer was built
    with pytest.warns(UnheldGradientWarning, match=r"2 trainable parameter\(s\).*head.weight, head.bias"):
        _step(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnheldGradientWarning)
        _step(model, optimizer)  # once


def test_a_peft_adapter_switch_is_warned_of():
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], lora_alpha=2), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["0"], lora_alpha=2))
    optimizer = build_optimizer(model, "scaled_adamw", lr=1e-3)
    model.base_model.set_adapter("b")
    with pytest.warns(UnheldGradientWarning, match="lora_A.b.weight"):
        optimizer.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()


def test_a_trainer_factory_without_a_learning_rate_is_refused():
    with pytest.raises(ValueError, match="without 'lr'.*learning_rate or weight_decay"):
        trainer_optimizer("scaled_adamw")()(_Lora(), reg=1.0)
    assert trainer_optimizer("scaled_adamw")()(_Lora(), lr=1e-3).param_groups[0]["lr"] == 1e-3


@pytest.mark.slow
def test_an_fsdp_launch_on_a_machine_without_cuda_stops_before_any_work(tmp_path, data_root):
    """The trap of the README's scaling-out section: this entry point stops, where a plain script would train twice
    alone and exit 0."""
    if torch.cuda.is_available():
        pytest.skip("the trap is that of a machine without CUDA")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    script = str(REPO_ROOT / "GPT-2" / "train.py")
    proc = subprocess.run([accelerate, "launch", "--use_fsdp", "--num_processes", "2", script, "preset=tiny",
                           "data.test_mrs=0", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode != 0
    assert "not supported on cpu" in proc.stderr or "would train alone" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("gpt2_e2e/*.json"))  # no record: nothing was trained


def test_the_readme_names_the_faults_it_promises_to_stop():
    text = (REPO_ROOT / "README.md").read_text() + "".join(p.read_text() for p in (REPO_ROOT / "docs").glob("*.md"))
    assert "accelerate launch --use_fsdp --num_processes 2" in text and "exits 0" in text
