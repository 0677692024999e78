"""The experiment scripts (*/scripts/*.sh): argument checks that stop before anything runs, and the configs that the
commands they run compose to. A fake `python` on PATH records the command a script runs; the `--cfg job` tests run
the real entry points, which only compose and print the config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Mistral-7B"))
import config_groups  # noqa: E402
from glue_metrics import GLUE_TASKS  # noqa: E402

config_groups.register_config_groups()
TABLES = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in (ROOT / "Mistral-7B/conf/tables").glob("*.yaml")}
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/scripts/*.sh"))
# the scripts that take a required choice, with a valid one (the others pass every argument to Hydra)
WITH_CHOICES = {"Mistral-7B/scripts/paper.sh": ["rte", "scaled_adamw"], "Mistral-7B/scripts/minilm_sst2.sh": ["sgd"],
                "Mistral-7B/scripts/sweep.sh": ["minilm_lr"], "GPT-2/scripts/e2e.sh": ["sgd"]}


def options(folder: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / folder).glob("*.yaml"))


@pytest.fixture
def fake_python(tmp_path):
    """Runs a script with a `python` on PATH that only writes its arguments to a file; returns (result, argv)."""
    argv_file = tmp_path / "argv"
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {argv_file}\n")
    fake.chmod(0o755)

    def run(script, *args):
        argv_file.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        return result, argv_file.read_text().splitlines() if argv_file.exists() else None

    return run


def run_real(script, *args):
    """Runs a script with the test's own interpreter as `python`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def compose_command(argv: list[str]):
    """The config (with Hydra's part) that the entry point argv[0] composes from the overrides argv[1:]; for a
    multirun (-m), that of its first job (the first value of each command-line sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entry = Path(argv[0]).resolve()
    overrides = []
    for override in OverridesParser.create().parse_overrides([a for a in argv[1:] if a != "-m"]):
        if override.is_sweep_override():
            overrides.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            overrides.append(override.input_line)
    with initialize_config_dir(config_dir=str(entry.parent / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


# ------------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("script,args,message,valid", [
    ("Mistral-7B/scripts/paper.sh", ["sst5", "adamw"], "unknown task 'sst5'", list(GLUE_TASKS)),
    ("Mistral-7B/scripts/paper.sh", [], "missing task", list(GLUE_TASKS)),
    ("Mistral-7B/scripts/paper.sh", ["task=rte", "adamw"], "unknown task 'task=rte'", list(GLUE_TASKS)),
    ("Mistral-7B/scripts/paper.sh", ["rte", "adam"], "unknown optimizer 'adam'", options("Mistral-7B/conf/optim")),
    ("Mistral-7B/scripts/paper.sh", ["rte"], "missing optimizer", options("Mistral-7B/conf/optim")),
    ("Mistral-7B/scripts/minilm_sst2.sh", ["optim=adamw"], "unknown optimizer 'optim=adamw'",
     options("Mistral-7B/conf/optim")),
    ("Mistral-7B/scripts/sweep.sh", ["minilm"], "unknown sweep 'minilm'", options("Mistral-7B/conf/sweep")),
    ("GPT-2/scripts/e2e.sh", ["scaled_adam"], "unknown optimizer 'scaled_adam'", options("GPT-2/conf/optim")),
    ("GPT-2/scripts/e2e.sh", [], "missing optimizer", options("GPT-2/conf/optim")),
])  # fmt: skip
def test_a_bad_argument_stops_before_anything_runs(fake_python, script, args, message, valid):
    result, argv = fake_python(script, *args)
    assert result.returncode == 2 and argv is None  # python never started
    assert message in result.stderr and f"usage: bash {script} " in result.stderr
    listed = result.stderr.split("valid: ")[1].splitlines()[0].split()
    assert sorted(listed) == sorted(valid)


# ------------------------------------------------------------------------------------------------ what runs
def test_paper_script_composes_the_task_optimizer_and_table_values():
    out = OmegaConf.create(run_real("Mistral-7B/scripts/paper.sh", "mrpc", "scaled_adamw", "--cfg", "job"))
    entry = TABLES["paper"]["mrpc"]["scaled_adamw"]
    assert (out.task.name, out.optim.name, out.optim.lr, out.optim.reg) == ("mrpc", "scaled_adamw", entry["lr"],
                                                                              entry["reg"])
    out = OmegaConf.create(run_real("Mistral-7B/scripts/paper.sh", "qnli", "adamw", "optim.lr=1e-3", "seed=7",
                                    "--cfg", "job"))
    assert (out.task.name, out.optim.name, out.optim.lr, out.seed) == ("qnli", "adamw", 1e-3, 7)
    assert "reg" not in out.optim and out.quantize is True


def test_minilm_script_composes_the_preset_at_the_tuned_lr():
    out = OmegaConf.create(run_real("Mistral-7B/scripts/minilm_sst2.sh", "scaled_gd", "--cfg", "job"))
    entry = TABLES["minilm"]["sst2"]["scaled_gd"]
    assert (out.tags.preset, out.task.name, out.table.name) == ("minilm_sst2", "sst2", "minilm")
    assert (out.optim.name, out.optim.lr, out.optim.reg) == ("scaled_gd", entry["lr"], entry["reg"])


def test_gpt2_paper_script_composes_the_optimizer_preset_on_hub_data():
    out = OmegaConf.create(run_real("GPT-2/scripts/e2e.sh", "scaled_adamw", "train.epochs=1", "--cfg", "job"))
    assert (out.optim.name, out.optim.lr, list(out.optim.betas), out.optim.reg) == ("scaled_adamw", 8e-4, [0.7, 0.8],
                                                                                      1e-6)
    assert out.data.root is None and out.model.name_or_path == "gpt2-medium" and out.train.epochs == 1


def test_sweep_script_runs_the_named_sweep_with_the_extra_overrides(fake_python):
    result, argv = fake_python("Mistral-7B/scripts/sweep.sh", "minilm_lr", "optim=adamw,scaled_adamw")
    assert result.returncode == 0, result.stderr
    assert Path(argv[0]).resolve() == ROOT / "Mistral-7B" / "train.py"
    assert argv[1:] == ["-m", "sweep=minilm_lr", "optim=adamw,scaled_adamw"]
    params = compose_command(argv).hydra.sweeper.params
    assert params.preset == "minilm_sst2" and params["optim.lr"] == "1e-5,1e-4,1e-3,1e-2"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_an_entry_point_whose_overrides_compose(fake_python, script):
    args = WITH_CHOICES.get(script, [])
    result, argv = fake_python(script, *args, "seed=3")
    assert result.returncode == 0, result.stderr
    entry = Path(argv[0]).resolve()
    assert entry.parent.parent == ROOT and entry.is_file() and argv[-1] == "seed=3"
    if entry.name == "runtime.py":  # an argparse command line
        assert subprocess.run([sys.executable, str(entry), "--help"], capture_output=True).returncode == 0
        return
    cfg = compose_command(argv)
    assert cfg.seed == 3 and cfg.optim.name and cfg.tags.preset
