"""Mistral-7B/conf: every preset composes; the per-task tables (conf/tables/*.yaml) reach the composed config."""
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
config_groups = load_module(ROOT / "Mistral-7B" / "config_groups.py")
GLUE_TASKS = load_module(ROOT / "Mistral-7B" / "glue_metrics.py").GLUE_TASKS
config_groups.register_config_groups()
PAPER_OPTIMS = ("sgd", "scaled_gd", "adamw", "scaled_adamw")
PEERS = ("peft_riemannian", "loraplus", "lora_rite")
TABLES = {path.stem: OmegaConf.to_container(OmegaConf.load(path)) for path in sorted((CONF / "tables").glob("*.yaml"))}
ENTRIES = [(table, task, optim) for table, by_task in TABLES.items() for task, by_optim in by_task.items()
           for optim in by_optim]


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def preset(optim):
    """conf/optim/<optim>.yaml as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "optim" / f"{optim}.yaml"))


@pytest.mark.parametrize("table,task,optim", ENTRIES)
def test_every_table_entry_sets_the_optimizer(table, task, optim):
    entry = TABLES[table][task][optim]
    c = cfg(f"table={table}", f"task={task}", f"optim={optim}")
    assert (c.task.name, c.optim.name, c.table.name) == (task, optim, table)
    assert c.optim.lr == pytest.approx(entry["lr"])
    if "reg" in entry:
        assert c.optim.reg == pytest.approx(entry["reg"])
    assert ("reg" in c.optim) == ("reg" in preset(optim))  # core rejects reg for the unscaled optimizers
    others = {k: v for k, v in preset(optim).items() if k not in entry}
    assert {k: OmegaConf.to_container(c.optim)[k] for k in others} == others


def test_paper_table_has_the_four_optimizers_on_every_task():
    assert set(TABLES["paper"]) == set(GLUE_TASKS)
    for task, by_optim in TABLES["paper"].items():
        assert set(by_optim) == set(PAPER_OPTIMS), task


def test_cfg_job_prints_the_table_values_literally():
    """`python Mistral-7B/train.py task=mrpc optim=scaled_adamw --cfg job` shows lr and reg as plain numbers."""
    out = subprocess.run([sys.executable, str(ROOT / "Mistral-7B" / "train.py"), "task=mrpc", "optim=scaled_adamw",
                          "--cfg", "job"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "  lr: 5.0e-05\n" in out and "  reg: 100.0\n" in out
    optim = OmegaConf.create(out).optim
    entry = TABLES["paper"]["mrpc"]["scaled_adamw"]
    assert (optim.name, optim.lr, optim.reg) == ("scaled_adamw", entry["lr"], entry["reg"])


def test_command_line_override_beats_the_table():
    c = cfg("task=mrpc", "optim=scaled_adamw", "optim.lr=1e-3", "optim.reg=2.0")
    assert (c.optim.lr, c.optim.reg) == (1e-3, 2.0)
    c = cfg("preset=minilm_sst2", "optim=adamw", "optim.lr=0.5")
    assert c.optim.lr == 0.5


@pytest.mark.parametrize("overrides", [("task=rte", "optim=loraplus"), ("table=minilm", "task=rte", "optim=adamw")])
def test_a_combination_without_entry_keeps_the_optimizer_preset(overrides):
    c = cfg(*overrides)
    table, task, optim = c.table.name, c.task.name, c.optim.name
    assert optim not in TABLES[table].get(task, {})
    assert OmegaConf.to_container(c.optim) == preset(optim)


@pytest.mark.parametrize("text,key,message", [
    ("rte:\n  sgd: {lr: -1.0}\n", "rte.sgd.lr", "must be > 0"),
    ("rte:\n  sgd: {lr: 1.0e-3, reg: 0.1}\n", "rte.sgd.reg", "takes no reg"),
    ("rte:\n  scaled_gd: {lr: 1.0e-3, reg: -0.1}\n", "rte.scaled_gd.reg", "must be >= 0"),
    ("rte:\n  scaled_gd: {lr: fast}\n", "rte.scaled_gd.lr", "must be a finite number, got 'fast'"),
    ("rte:\n  adamw: {lr: true}\n", "rte.adamw.lr", "must be a finite number, got True"),
    ("rte:\n  adamw: {reg: 0.1}\n", "rte.adamw", "missing lr"),
    ("rte:\n  adamw: {lr: 1.0e-3, betas: [0.9, 0.99]}\n", "rte.adamw", r"unknown key\(s\) \['betas'\]"),
    ("rte:\n  adamw: 1.0e-3\n", "rte.adamw", "must be a mapping"),
    ("rte:\n  adam: {lr: 1.0e-3}\n", "rte.adam", "unknown optimizer 'adam'"),
    ("sst5:\n  adamw: {lr: 1.0e-3}\n", "", "unknown task 'sst5'"),
    ("rte: 1.0e-3\n", "", "rte must map optimizer names"),
    ("- rte\n", "", "expected a mapping task -> optimizer"),
])
def test_a_malformed_table_entry_is_a_clear_error(tmp_path, text, key, message):
    conf = tmp_path / "conf"
    (conf / "tables").mkdir(parents=True)
    (conf / "optim").symlink_to(CONF / "optim")
    bad = conf / "tables" / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(config_groups.TableError, match=message) as err:
        config_groups.register_config_groups(conf)
    assert str(err.value).startswith(f"{bad}: {key}")
    with pytest.raises(MissingConfigException):  # nothing of the bad table was registered
        cfg("table=bad")


def test_unknown_table_task_and_optimizer_are_clear_errors():
    with pytest.raises(MissingConfigException, match="table/nosuch"):
        cfg("table=nosuch")
    with pytest.raises(MissingConfigException, match="task/sst5"):
        cfg("task=sst5")
    with pytest.raises(MissingConfigException, match="optim/adam"):
        cfg("optim=adam")


def test_paper_recipe_defaults():
    c = cfg()
    assert (c.task.name, c.optim.name, c.seed, c.quantize) == ("rte", "scaled_adamw", 42, True)
    assert (c.train.batch_size, c.train.epochs, c.optim.weight_decay) == (8, 5, 0.01)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 16, 0.05)
    assert list(c.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    assert c.model.name_or_path == "mistralai/Mistral-7B-v0.1" and c.model.pad_token == "eos"
    assert c.threads is None and c.wandb is None and c.data.root is None  # GLUE from the hub
    assert OmegaConf.to_container(c.tags, resolve=True) == {"preset": "mistral7b_glue", "task": "rte"}
    assert Path(c.results_dir) == ROOT / "results"


@pytest.mark.parametrize("optim", PAPER_OPTIMS + PEERS)
def test_minilm_preset_composes_with_every_optimizer(optim):
    c = cfg("preset=minilm_sst2", f"optim={optim}")
    OmegaConf.resolve(c)
    assert c.tags.preset == "minilm_sst2" and c.task.name == "sst2" and c.quantize is False
    assert c.table.name == "minilm" and c.optim.lr == TABLES["minilm"]["sst2"][optim]["lr"]
    assert list(c.lora.target_modules) == ["query", "value"] and c.threads == 1
    assert (Path(c.model.name_or_path) / "config.json").is_file()
    assert Path(c.data.root) == default_data_root()
    assert c.data.max_length == 64
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
    for name in str(params.get("task", "")).split(","):
        if name:
            assert name in GLUE_TASKS, name


def test_reg_sweep_records_under_its_own_preset_tag():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = compose("config", overrides=["sweep=minilm_reg"], return_hydra_config=True).hydra.sweeper.params
    assert params["tags.preset"] == "minilm_sst2_reg"
    assert cfg("preset=minilm_sst2", "tags.preset=minilm_sst2_reg").tags.preset == "minilm_sst2_reg"
