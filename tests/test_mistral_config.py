"""Mistral-7B/conf: every preset composes and carries the per-task lr / reg of the paper's table."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from _tiny import tiny_peft_llama
from harness import REPO_ROOT as ROOT
from harness import build_optimizer, default_data_root, load_module

CONF = ROOT / "Mistral-7B" / "conf"
glue_data = load_module(ROOT / "Mistral-7B" / "glue_data.py")
TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
PAPER_OPTIMS = ("sgd", "scaled_gd", "adamw", "scaled_adamw")
PEERS = ("peft_riemannian", "loraplus", "lora_rite")

# The authors' parameter table: task -> (sgd, scaled_gd, adamw, scaled_adamw) lr
PAPER_LR = {
    **{t: (5e-3, 5e-3, 5e-5, 5e-5) for t in ("rte", "cola", "sst2", "stsb", "mrpc", "wnli")},
    "qnli": (5e-3, 9e-4, 1e-5, 1e-5), "mnli": (5e-3, 1e-3, 5e-6, 3e-5), "qqp": (5e-3, 4e-3, 5e-6, 3e-5),
}
SCALED_ADAMW_REG = {"rte": 4.5, "cola": 1.1e-2, "sst2": 0.9, "stsb": 1e-2, "mrpc": 100, "wnli": 10,
                    "qnli": 1e-6, "mnli": 1e-6, "qqp": 1e-6}
SCALED_GD_REG = {"rte": 0.5, "cola": 0.1, "sst2": 1e-2, "stsb": 1e-2, "mrpc": 1e-2, "wnli": 1e-6,
                 "qnli": 1e-2, "mnli": 1e-7, "qqp": 5e-7}


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("task", TASKS)
def test_paper_table_per_task(task):
    for optim, lr in zip(PAPER_OPTIMS, PAPER_LR[task]):
        c = cfg(f"task={task}", f"optim={optim}")
        assert c.task.name == task and c.optim.name == optim
        assert c.optim.lr == pytest.approx(lr), (task, optim)
        if optim == "scaled_adamw":
            assert c.optim.reg == pytest.approx(SCALED_ADAMW_REG[task])
        elif optim == "scaled_gd":
            assert c.optim.reg == pytest.approx(SCALED_GD_REG[task])
        else:
            assert "reg" not in c.optim  # core.build_optimizer rejects reg for the unscaled optimizers


def test_paper_recipe_defaults():
    c = cfg()
    assert (c.task.name, c.optim.name, c.seed, c.quantize) == ("rte", "scaled_adamw", 42, True)
    assert (c.train.batch_size, c.train.epochs, c.optim.weight_decay) == (8, 5, 0.01)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 16, 0.05)
    assert list(c.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    assert c.model.name_or_path == "mistralai/Mistral-7B-v0.1" and c.model.pad_token == "eos"


def test_command_line_override_beats_the_table():
    c = cfg("task=mrpc", "optim=scaled_adamw", "optim.lr=1e-3", "optim.reg=2.0")
    assert (c.optim.lr, c.optim.reg) == (1e-3, 2.0)


@pytest.mark.parametrize("optim", PAPER_OPTIMS + PEERS)
def test_minilm_preset_composes_with_every_optimizer(optim):
    c = cfg("preset=minilm_sst2", f"optim={optim}")
    OmegaConf.resolve(c)
    assert c.name == "minilm_sst2" and c.task.name == "sst2" and c.quantize is False
    assert list(c.lora.target_modules) == ["query", "value"]
    assert (Path(c.model.name_or_path) / "config.json").is_file()
    assert Path(c.data.root) == default_data_root()
    assert c.optim.lr > 0 and c.data.max_length == 64
    assert ("reg" in c.optim) == (optim in ("scaled_gd", "scaled_adamw", "peft_riemannian"))
    if optim == "loraplus":
        assert c.optim.loraplus_lr_ratio > 0


@pytest.mark.parametrize("optim", PAPER_OPTIMS + PEERS)
def test_optim_yaml_builds_and_steps_its_optimizer(optim):
    """Each optim yaml is exactly what harness.build_optimizer takes for that name: it builds and trains."""
    model = tiny_peft_llama()
    optimizer = build_optimizer(model, **OmegaConf.to_container(cfg(f"optim={optim}").optim, resolve=True))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_sweep_files_compose(sweep):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        c = compose("config", overrides=[f"sweep={sweep}"], return_hydra_config=True)
    params = c.hydra.sweeper.params
    assert "optim" in params or "task" in params
    for name in str(params.get("optim", "")).split(","):
        if name:
            assert (CONF / "optim" / f"{name}.yaml").is_file(), name


def test_unknown_task_is_a_clear_error():
    with pytest.raises(MissingConfigException, match="task/sst5"):
        cfg("task=sst5")


def test_cfg_job_shows_the_table_values():
    """The issue's command: `python Mistral-7B/train.py task=mrpc optim=scaled_adamw --cfg job`."""
    out = subprocess.run([sys.executable, str(ROOT / "Mistral-7B" / "train.py"), "task=mrpc", "optim=scaled_adamw",
                          "--cfg", "job"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    optim = OmegaConf.create(out).optim
    assert (optim.name, optim.lr, optim.reg) == ("scaled_adamw", 5e-5, 100)


def test_scripts_are_one_line_calls_of_the_entry_point():
    scripts = sorted((ROOT / "Mistral-7B" / "scripts").glob("*.sh"))
    assert len(scripts) >= len(TASKS) * len(PAPER_OPTIMS)
    for script in scripts:
        commands = [ln for ln in script.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(commands) == 1 and "train.py" in commands[0], script.name
    for task in TASKS:
        for optim in PAPER_OPTIMS:
            text = (ROOT / "Mistral-7B" / "scripts" / f"{task}_{optim}.sh").read_text()
            assert f"task={task}" in text and f"optim={optim}" in text
