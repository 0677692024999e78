"""Mistral-7B/train.py end to end on CPU: a tiny Mistral built in code, LoRA on q,k,v,o,gate, a GLUE-format
fixture, a few Trainer steps with each optimizer, the results record, Table 2 from the records."""
import importlib.util
import json
import math
import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import REPO_ROOT as ROOT
from harness import load_module
from test_mistral_data import write_glue  # the GLUE-format fixture (tests/test_mistral_data.py)

OPTIMS = ("sgd", "scaled_gd", "adamw", "scaled_adamw", "peft_riemannian", "loraplus", "lora_rite")
WORDS = "the a cat dog mat sat on is not good bad . ? any broken row".split()
train_mod = load_module("Mistral-7B/train.py", "mistral_train")
make_table_mod = load_module("Mistral-7B/make_table.py")


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """A 2-layer Mistral checkpoint (causal-LM weights, as on the hub) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_mistral")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2)
    MistralForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


def tiny_cfg(tmp_path, model_dir, glue_root, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "Mistral-7B" / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"model.name_or_path={model_dir}", "quantize=false", f"data.root={glue_root}",
            "train.max_steps=3", "train.batch_size=2", "train.eval_batch_size=4", "train.logging_steps=1",
            "train.use_cpu=true", f"results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'out'}",
            *overrides])


@pytest.mark.parametrize("optim", OPTIMS)
def test_a_few_trainer_steps_with_each_optimizer(tmp_path, tiny_mistral, glue_root, optim):
    cfg = tiny_cfg(tmp_path, tiny_mistral, glue_root, "task=rte", f"optim={optim}", "optim.lr=1e-2")
    accuracy = train_mod.train(cfg)
    assert 0.0 <= accuracy <= 1.0
    (path,) = (tmp_path / "results" / "glue").glob("*.json")
    record = json.loads(path.read_text())
    assert record["experiment"] == "glue" and record["optimizer"] == optim
    assert record["tags"] == {"preset": "mistral7b_glue", "task": "rte"}
    assert ("_reg" in record["run_name"]) == ("reg" in record["hparams"])
    assert record["final_metrics"]["steps"] == 3 and record["final_metrics"]["accuracy"] == accuracy
    assert [s["step"] for s in record["steps"]] == [1, 2, 3]
    assert all(math.isfinite(s["loss"]) and s["time_s"] > 0 for s in record["steps"])
    assert record["step_time_s"] > 0
    assert ("reg" in record["hparams"]) == (optim in ("scaled_gd", "scaled_adamw", "peft_riemannian"))


def test_lora_sits_on_the_named_projections_and_training_moves_it(tmp_path, tiny_mistral, glue_root, monkeypatch):
    from core import find_lora_pairs

    built = []
    load_model = train_mod.load_model
    monkeypatch.setattr(train_mod, "load_model", lambda *a: built.append(load_model(*a)) or built[-1])
    cfg = tiny_cfg(tmp_path, tiny_mistral, glue_root, "optim=scaled_adamw", "optim.lr=1e-2")
    train_mod.train(cfg)
    tokenizer, model = built[0]
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and model.config.pad_token_id == 2
    pairs = find_lora_pairs(model)
    assert all(p.B.abs().sum() > 0 for p in pairs)  # PEFT starts B at zero: the optimizer moved every pair
    projections = sorted({re.sub(r"\[.*\]$", "", p.name.split(".")[-1]) for p in pairs})
    assert projections == ["gate_proj", "k_proj", "o_proj", "q_proj", "v_proj"] and len(pairs) == 2 * 5
    assert all(p.A.shape[0] == 16 for p in pairs)  # rank 16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # the classifier head trains too (task_type SEQ_CLS)


def test_regression_and_two_dev_splits(tmp_path, tiny_mistral, glue_root):
    pearson = train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, "task=stsb", "optim=adamw"))
    assert -1.0 <= pearson <= 1.0 or math.isnan(pearson)
    train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, "task=mnli", "optim=scaled_gd"))
    records = {json.loads(p.read_text())["tags"]["task"]: json.loads(p.read_text())
               for p in (tmp_path / "results" / "glue").glob("*.json")}
    assert {"pearson", "spearmanr"} <= set(records["stsb"]["final_metrics"])
    assert {"accuracy", "mismatched_accuracy"} <= set(records["mnli"]["final_metrics"])


def test_missing_data_folder_and_unknown_optimizer_fail_clearly(tmp_path, tiny_mistral, glue_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_mod.train(tiny_cfg(tmp_path, tiny_mistral, tmp_path / "no_glue_here"))
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, "optim=adamw", "+optim.reg=1.0"))


def test_quantize_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="quantize=true needs bitsandbytes"):
        train_mod.nf4_config()


def test_table_from_records(tmp_path, tiny_mistral, glue_root):
    for task, optim in (("rte", "adamw"), ("rte", "scaled_adamw"), ("wnli", "adamw")):
        train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, f"task={task}", f"optim={optim}",
                                 "train.max_steps=1"))
    table = make_table_mod.make_table(tmp_path / "results")
    lines = table.splitlines()
    header = next(ln for ln in lines if ln.startswith("| optimizer"))
    assert "rte" in header and "wnli" in header and "avg" in header
    rows = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| ") and "optimizer" not in ln}
    assert set(rows) == {"adamw", "scaled_adamw"}
    assert rows["scaled_adamw"].count("–") >= 1  # no wnli run for scaled_adamw


def test_a_non_finite_gradient_is_recorded_as_divergence(tmp_path, tiny_mistral, glue_root, monkeypatch):
    from core import NonFiniteGradientError

    build = train_mod.build_optimizer

    def build_failing_on_step_2(model, **hparams):
        optimizer = build(model, **hparams)

        class FailingOnStep2(type(optimizer)):
            calls = 0

            def step(self, *args, **kwargs):
                FailingOnStep2.calls += 1
                if FailingOnStep2.calls == 2:
                    raise NonFiniteGradientError("non-finite gradient (test)")
                return super().step(*args, **kwargs)

        optimizer.__class__ = FailingOnStep2
        return optimizer

    monkeypatch.setattr(train_mod, "build_optimizer", build_failing_on_step_2)
    accuracy = train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, "optim=scaled_adamw"))
    (path,) = (tmp_path / "results" / "glue").glob("*.json")
    final = json.loads(path.read_text())["final_metrics"]
    assert final["diverged_at_step"] == 2 and final["steps"] == 1 and final["accuracy"] == accuracy


def test_runs_differing_only_in_reg_keep_separate_records(tmp_path, tiny_mistral, glue_root):
    for reg in (1e-6, 1.0):
        train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, "optim=scaled_adamw", f"optim.reg={reg}",
                                 "train.max_steps=1"))
    regs = sorted(json.loads(p.read_text())["hparams"]["reg"] for p in (tmp_path / "results" / "glue").glob("*.json"))
    assert regs == [1e-6, 1.0]


def test_sweep_and_reg_tables_from_records(tmp_path, tiny_mistral, glue_root):
    for optim, lr, reg in (("adamw", 1e-3, None), ("adamw", 1e-2, None), ("scaled_adamw", 1e-3, 0.5),
                           ("scaled_adamw", 1e-3, 2.0)):
        train_mod.train(tiny_cfg(tmp_path, tiny_mistral, glue_root, f"optim={optim}", f"optim.lr={lr}",
                                 "train.max_steps=1", *([] if reg is None else [f"optim.reg={reg}"])))
    results = tmp_path / "results"
    reg_table = make_table_mod.make_reg_table(results, presets=("mistral7b_glue",), task="rte")
    assert [ln.split("|")[1].strip() for ln in reg_table.splitlines()[4:]] == ["0.5", "2"]
    with pytest.raises(ValueError, match="several reg values"):
        make_table_mod.make_sweep_table(results, preset="mistral7b_glue", task="rte")
    for path in results.glob("glue/scaled_adamw_*_reg2_*.json"):
        path.unlink()
    sweep = make_table_mod.make_sweep_table(results, preset="mistral7b_glue", task="rte")
    header, *rows = [ln for ln in sweep.splitlines() if ln.startswith("| ")]
    assert "lr 0.001" in header and "lr 0.01" in header and "step time" in header
    assert [r.split("|")[1].strip() for r in rows] == ["adamw", "scaled_adamw"]
    assert rows[1].split("|")[3].strip() == "–"  # scaled_adamw did not run at 1e-2
