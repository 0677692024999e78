"""GPT-2 LoRA placement: merged q/v LoRA on the fused c_attn (loralib MergedLinear semantics) and PEFT placement."""

import json

import pytest
import torch
from omegaconf import OmegaConf

import core
from harness import load_module, trainable_state

lora_layers = load_module("GPT-2/lora_layers.py")
models = load_module("GPT-2/models.py")

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 50257}
LORA = {"placement": "merged_qv", "target_modules": ["c_attn"], "enable_lora": [True, False, True], "r": 4,
        "alpha": 32, "dropout": 0.1}


def tiny_gpt2(data_root, seed=0):
    torch.manual_seed(seed)
    cfg = OmegaConf.create({"name_or_path": None, "package": None, "gguf_file": None, "config": TINY,
                            "config_file": None, "tokenizer": str(data_root / "gpt2-tokenizer"),
                            "tokenizer_class": "GPT2TokenizerFast"})
    return models.load_model(cfg)


def test_merged_lora_sits_on_q_and_v_of_every_c_attn(data_root):
    model, tok = tiny_gpt2(data_root)
    model = lora_layers.apply_lora(model, OmegaConf.create(LORA))
    r, d = 4, TINY["n_embd"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == [f"transformer.h.{i}.attn.c_attn.lora_{f}" for i in range(2) for f in "AB"]
    for i in range(2):
        assert trainable[f"transformer.h.{i}.attn.c_attn.lora_A"].shape == (2 * r, d)
        assert trainable[f"transformer.h.{i}.attn.c_attn.lora_B"].shape == (2 * d, r)
    # loralib's count for MergedLinear(d, 3d, r, enable_lora=[T, F, T]): lora_A (2r, d) + lora_B (2d, r) per layer
    assert lora_layers.count_trainable(model) == TINY["n_layer"] * 2 * r * (d + d)
    pairs = core.find_lora_pairs(model)
    assert [(p.name, p.blocks, p.rank) for p in pairs] == [(f"transformer.h.{i}.attn.c_attn", 2, r) for i in range(2)]
    # the tokenizer is the real GPT-2 one
    assert tok.eos_token_id == 50256 and tok("Blue Spice")["input_ids"] == [14573, 43537]


def test_gpt2_medium_trainable_count_is_the_papers(data_root):
    config = json.loads((data_root / "gpt2-tokenizer" / "gpt2-medium-config.json").read_text())
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(**config))
        model = lora_layers.apply_lora(model, OmegaConf.create(LORA))
    assert lora_layers.count_trainable(model) == 393_216  # LoRA paper, GPT-2 M (LoRA): 0.35M


def test_delta_is_block_diagonal_on_q_and_v_only():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    n, d, r = 6, 5, 2
    base = Conv1D(3 * d, n)
    layer = lora_layers.MergedLoRA(base, r=r, alpha=4, dropout=0.0, enable_lora=[True, False, True])
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, n)
    out, ref = layer(x), base(x)
    A, B = layer.lora_A, layer.lora_B
    scale = 4 / r
    torch.testing.assert_close(out[..., :d], ref[..., :d] + scale * x @ (B[:d] @ A[:r]).T)
    torch.testing.assert_close(out[..., d:2 * d], ref[..., d:2 * d])  # k untouched
    torch.testing.assert_close(out[..., 2 * d:], ref[..., 2 * d:] + scale * x @ (B[d:] @ A[r:]).T)
    # loralib's own formulation: merge_AB is a grouped conv1d, zero_pad scatters it into the q and v rows
    merged = torch.nn.functional.conv1d(A.unsqueeze(0), B.unsqueeze(-1), groups=2).squeeze(0)  # (2d, n)
    full = torch.cat([merged[:d], torch.zeros(d, n), merged[d:]])  # (3d, n)
    torch.testing.assert_close(out, ref + scale * x @ full.T)
    lin = lora_layers.MergedLoRA(torch.nn.Linear(n, 3 * d), r=r, alpha=4, dropout=0.0, enable_lora=[True] * 3)
    assert lin.lora_A.shape == (3 * r, n) and lin.lora_B.shape == (3 * d, r)
    torch.testing.assert_close(lin(x), lin.base(x))  # B starts at zero: the base model


def test_bad_placements_are_named(data_root):
    model, _ = tiny_gpt2(data_root)
    with pytest.raises(ValueError, match="unknown lora.placement 'qkv'"):
        lora_layers.apply_lora(model, OmegaConf.create({**LORA, "placement": "qkv"}))
    with pytest.raises(ValueError, match="no Conv1D/Linear module named 'q_proj'"):
        lora_layers.apply_lora(model, OmegaConf.create({**LORA, "target_modules": ["q_proj"]}))
    with pytest.raises(TypeError, match="Conv1D or nn.Linear"):
        lora_layers.MergedLoRA(torch.nn.Embedding(3, 3), 2, 4, 0.0, [True])


def test_scaled_adamw_trains_the_merged_pairs(data_root):
    model, _ = tiny_gpt2(data_root)
    model = lora_layers.apply_lora(model, OmegaConf.create(LORA))
    opt = core.build_optimizer(model, "scaled_adamw", lr=1e-2, betas=(0.7, 0.8), weight_decay=0.0, reg=1e-6)
    before = trainable_state(model)
    ids = torch.randint(0, 50257, (2, 8))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = trainable_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_peft_placement_on_separate_q_and_v():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    cfg = OmegaConf.create({**LORA, "placement": "peft", "target_modules": ["q_proj", "v_proj"]})
    model = lora_layers.apply_lora(model, cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2 and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8)
    assert lora_layers.count_trainable(model) == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert len(core.find_lora_pairs(model)) == 4
