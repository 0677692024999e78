"""The paper-scale paths at full size where that is cheap (meta device: counts, pairing) and through the same code
at reduced size where it is not (scripts/paper_scale_check.py; the full check is that script, not a test)."""

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import core

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "GPT-2"), str(ROOT / "scripts")]
e2e_data = importlib.import_module("e2e_data")
gpt2_models = importlib.import_module("models")
lora_layers = importlib.import_module("lora_layers")
gpt2_train = importlib.import_module("train")  # GPT-2/train.py: registers the config resolvers
check = importlib.import_module("paper_scale_check")


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, ROOT / "Mistral-7B" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mistral_train = _load("mistral_train_scale", "train.py")


def gpt2_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "GPT-2" / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def mistral_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "Mistral-7B" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- GPT-2 medium ---------------------------------------------------------------------------------------------

def test_gpt2_medium_paper_lora_has_393216_trainable_parameters(data_root):
    cfg = gpt2_cfg("model=gpt2_medium_random")
    assert (cfg.lora.r, cfg.train.batch_size, cfg.data.max_length, cfg.decode.num_beams) == (4, 8, 512, 10)
    with torch.device("meta"):  # the full-size model without allocating its 355M weights
        model = gpt2_models.build_config_model(cfg.model)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (24, 1024, 16)
    model = lora_layers.apply_lora(model, cfg.lora)
    assert lora_layers.count_trainable(model) == 393_216 == 24 * 2 * 4 * (1024 + 1024)
    assert check.expected_gpt2_trainable(Path(cfg.model.config_file), 4) == 393_216
    pairs = core.find_lora_pairs(model)
    assert len(pairs) == 24 and {p.blocks for p in pairs} == {2}  # c_attn of each layer: a q and a v block
    assert {(tuple(p.A.shape), tuple(p.B.shape)) for p in pairs} == {((2 * 4, 1024), (2 * 1024, 4))}


def test_gpt2_medium_random_model_and_tokenizer_load_with_a_layer_override(data_root):
    cfg = gpt2_cfg("model=gpt2_medium_random", "model.config={n_layer: 1}")
    model, tokenizer = gpt2_models.load_model(cfg.model)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (1, 1024, 50257)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


def test_e2e_pair_cut_before_its_reference_is_a_clear_error(data_root):
    """Such pairs have no loss term: a batch of them gave a NaN loss, recorded as a divergence."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(data_root / "gpt2-tokenizer")
    dev = e2e_data.read_pairs(data_root / "e2e" / "devset.csv")
    pairs = dev[:7] + [max(dev, key=lambda p: len(p[0]))]  # the longest MR: its prompt alone is over 32 tokens
    assert len(e2e_data.E2EDataset(pairs, tokenizer, 64)) == 8
    with pytest.raises(ValueError, match=r"1 of 8 E2E pairs keep no reference token within max_length=32 .*"
                                         r"raise data.max_length"):
        e2e_data.E2EDataset(pairs, tokenizer, 32)


@pytest.mark.slow
def test_the_gpt2_check_through_train_py_with_one_layer(tmp_path, data_root):
    """The check's gpt2 part (paper config through GPT-2/train.py, hub-layout data, decoding, scoring), 1 layer."""
    lines = list(check.part_gpt2(argparse.Namespace(
        data_root=data_root, workdir=tmp_path, optimizers=["scaled_gd"], threads=1,
        gpt2_override=["model.config={n_layer: 1}", "data.max_length=64", "decode.max_new_tokens=8"])))
    assert len(lines) == 1 and lines[0].startswith("scaled_gd: 16,384 trainable; steps ")
    rec = json.loads((tmp_path / "results" / "gpt2_e2e" / "paper_scale_scaled_gd.json").read_text())
    assert rec["config"]["data"]["root"] is None and rec["config"]["train"]["batch_size"] == 8
    assert rec["config"]["decode"]["num_beams"] == 10 and rec["tags"]["preset"] == "paper_scale_check"
    assert [s["step"] for s in rec["steps"]] == [1, 2, 3] and rec["final_metrics"]["test_mrs"] == 2
    assert rec["final_metrics"]["decode_time_s"] > 0 and rec["final_metrics"]["score_time_s"] > 0
    # the training data: the dev set minus 2 held-out MRs, read through data.hub_path
    hub = tmp_path / "gpt2_e2e_hub" / "default"
    dev = e2e_data.read_pairs(data_root / "e2e" / "devset.csv")
    held = e2e_data.group_by_mr(dev)[0][-2:]
    splits = e2e_data.load_hub_splits(str(hub))
    assert splits["train"] == [p for p in dev if p[0] not in held]
    assert {mr for mr, _ in splits["validation"]} <= set(held) and len(splits["validation"]) == 16


def test_seq512_step_that_cannot_fit_in_memory_stops_before_running(tmp_path):
    with pytest.raises(check.CheckFailed, match="needs about 362 GB on CPU.*--seq512-batch"):
        check.main(["--parts", "gpt2_seq512", "--seq512-batch", "100", "--workdir", str(tmp_path)])


# --- Mistral-7B -----------------------------------------------------------------------------------------------

def test_mistral_7b_meta_model_has_the_paper_trainable_count_and_every_factor_is_paired():
    from transformers import MistralConfig

    cfg = mistral_cfg()  # the paper recipe: rte, scaled_adamw, quantize=true
    model = mistral_train.empty_model(cfg, 2, MistralConfig(**check.MISTRAL_7B))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 7.1e9
    # by hand: r (in + out) per target: q 4096->4096, k and v 4096->1024 (8 kv heads x 128), o 4096->4096,
    # gate 4096->14336; 32 layers; the classifier head 4096 x 2 (no bias) trains too (task_type SEQ_CLS)
    r = 16
    per_layer = r * (4096 + 4096) + 2 * r * (4096 + 1024) + r * (4096 + 4096) + r * (4096 + 14336)
    expected = 32 * per_layer + 4096 * 2
    assert expected == 23_076_864
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert check.mistral_expected_trainable(check.MISTRAL_7B, r, list(cfg.lora.target_modules), 2) == expected
    from omegaconf import OmegaConf

    optimizer = core.build_optimizer(model, "scaled_adamw", **{k: v for k, v in OmegaConf.to_container(
        cfg.optim).items() if k != "name"})
    pairs = core.find_lora_pairs(model)
    assert len(pairs) == 32 * 5
    lora_ids = {id(p) for n, p in trainable.items() if "lora_" in n}
    assert {id(t) for p in pairs for t in (p.A, p.B)} == lora_ids and len(lora_ids) == 2 * 32 * 5
    group_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in group_params} == {id(p) for p in trainable.values()}
    assert sum(len(g["pairs"]) for g in optimizer.param_groups) == 160  # every factor pair is preconditioned


def test_the_4bit_config_composes_with_the_paper_recipe(monkeypatch):
    from transformers import BitsAndBytesConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    cfg = mistral_cfg("task=mrpc", "model.dtype=bfloat16")
    kwargs = mistral_train.model_kwargs(cfg, 2)
    q = kwargs["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig) and q.load_in_4bit and not q.load_in_8bit
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype, q.bnb_4bit_use_double_quant) == (
        "nf4", torch.bfloat16, False)
    assert kwargs["device_map"] == {"": 0} and kwargs["num_labels"] == 2 and kwargs["dtype"] == torch.bfloat16
    assert BitsAndBytesConfig.from_dict(q.to_dict()).to_dict() == q.to_dict()


def _forbid_loading(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("something was loaded before the quantization check")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_quantize_without_bitsandbytes_stops_before_loading_anything(monkeypatch):
    _forbid_loading(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="quantize=true needs bitsandbytes .*is not installed.*quantize=false"):
        mistral_train.train(mistral_cfg())


@pytest.mark.parametrize("use_cpu", [False, True])
def test_quantize_on_cpu_stops_before_loading_anything(monkeypatch, use_cpu):
    _forbid_loading(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = "train.use_cpu=true" if use_cpu else "no CUDA GPU is visible"
    with pytest.raises(RuntimeError, match=f"quantize=true needs a CUDA GPU .*but {reason}; use quantize=false"):
        mistral_train.train(mistral_cfg(f"train.use_cpu={str(use_cpu).lower()}"))


# --- the check script -----------------------------------------------------------------------------------------

def test_check_script_hub_data_and_mistral_parts(tmp_path, capsys, data_root):
    times = check.main(["--parts", "hub_data", "mistral", "--workdir", str(tmp_path)])
    assert set(times) == {"hub_data", "mistral"} and all(t > 0 for t in times.values())
    out = capsys.readouterr().out
    assert "630 test MRs grouped as the scorer groups them" in out and "labels equal" in out
    assert "23,076,864 trainable (= 23,076,864 from the shapes" in out and "pairs all 160 (A, B)" in out
    assert "summary: hub_data " in out


def test_check_script_lists_parts_and_rejects_unknown_ones(capsys):
    assert check.main(["--list"]) == {}
    assert set(capsys.readouterr().out.split()) >= set(check.PARTS)
    with pytest.raises(SystemExit):
        check.main(["--parts", "nope"])
    assert "unknown part(s) or optimizer(s) ['nope']" in capsys.readouterr().err
