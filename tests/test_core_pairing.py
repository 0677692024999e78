"""Pairing by module name: every supported flavour, and clear errors for what cannot be paired."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from core import LoraPairingError, build_optimizer, find_lora_pairs
from _tiny import LoraDownUp, MergedLoraLinear, MixedModel, tiny_llama, tiny_peft_llama


def test_peft_linear_pairs_are_named_after_their_modules():
    model = tiny_peft_llama()
    pairs = find_lora_pairs(model)
    assert len(pairs) == 4  # 2 layers x (q, v)
    for pair in pairs:
        assert pair.a_name.endswith("lora_A.default.weight") and pair.b_name.endswith("lora_B.default.weight")
        assert pair.a_name.rsplit(".lora_A", 1)[0] == pair.b_name.rsplit(".lora_B", 1)[0]
        assert pair.name.endswith("[default]") and pair.A.shape[0] == pair.B.shape[1] == 4


def test_pairing_does_not_depend_on_parameter_order():
    class UpFirst(nn.Module):  # B registered before A
        def __init__(self, n, m, r):
            super().__init__()
            self.lora_up = nn.Linear(r, m, bias=False)
            self.lora_down = nn.Linear(n, r, bias=False)

    model = nn.ModuleDict({"x": UpFirst(4, 6, 2), "y": LoraDownUp(5, 7, 3)})
    order = [n for n, _ in model.named_parameters()]
    assert order.index("x.lora_up.weight") < order.index("x.lora_down.weight")
    pairs = {p.name: p for p in find_lora_pairs(model)}
    assert pairs["x"].A is model["x"].lora_down.weight and pairs["x"].B is model["x"].lora_up.weight
    assert pairs["y"].A.shape == (3, 5) and pairs["y"].B.shape == (7, 3)


def test_conv_pairs_use_k_by_k_A_and_1x1_B():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"]))
    pairs = {p.name: p for p in find_lora_pairs(model)}
    assert set(pairs) == {"base_model.model.0[default]", "base_model.model.2[default]"}
    assert pairs["base_model.model.0[default]"].A.shape == (2, 3, 3, 3)
    assert pairs["base_model.model.0[default]"].B.shape == (8, 2, 1, 1)


def test_embedding_lora_pairs():
    model = tiny_peft_llama(targets=("embed_tokens", "q_proj"))
    names = [p.name for p in find_lora_pairs(model)]
    emb = [p for p in find_lora_pairs(model) if "embed_tokens" in p.name]
    assert len(emb) == 1 and len(names) == 3
    assert emb[0].a_name.endswith("lora_embedding_A.default") and emb[0].A.shape == (4, 64)
    assert emb[0].B.shape == (32, 4)


def test_several_adapters_on_one_module_are_separate_pairs():
    model = tiny_peft_llama()
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(find_lora_pairs(model)) == 4  # only the active adapter is trainable
    for name, p in model.named_parameters():
        if ".second." in name:
            p.requires_grad_(True)
    pairs = find_lora_pairs(model)
    assert len(pairs) == 6
    second = [p for p in pairs if p.name.endswith("[second]")]
    assert len(second) == 2 and all(p.rank == 2 for p in second)


def test_lora_down_up_and_merged_blocks():
    model = MixedModel()
    pairs = {p.name: p for p in find_lora_pairs(model)}
    assert set(pairs) == {"l1", "l2", "merged"}
    assert pairs["l1"].A is model.l1.lora_down.weight and pairs["l1"].B is model.l1.lora_up.weight
    assert pairs["merged"].blocks == 2 and pairs["merged"].rank == 3


def test_unpaired_factor_is_an_error_naming_the_module():
    model = MixedModel()
    model.l2.lora_up.weight.requires_grad_(False)
    with pytest.raises(LoraPairingError, match=r"unpaired LoRA factor in module 'l2'.*no trainable B"):
        find_lora_pairs(model)


def test_shapes_that_do_not_chain_are_an_error():
    layer = LoraDownUp(6, 5, 3)
    layer.lora_up = nn.Linear(4, 5, bias=False)  # rank 4 does not match A's 3 rows
    model = nn.Sequential(layer)
    with pytest.raises(LoraPairingError, match=r"LoRA pair '0': shapes do not chain: A \(3, 6\).*B \(5, 4\)"):
        find_lora_pairs(model)


def test_merged_block_count_must_divide_the_shapes():
    layer = MergedLoraLinear(6, 2)
    layer.enable_lora = [True, True, True]  # says 3 blocks but A holds 2 x r rows
    with pytest.raises(LoraPairingError, match="with 3 block"):
        find_lora_pairs(nn.Sequential(layer))


def test_scaled_optimizer_on_a_model_without_lora_is_an_error():
    with pytest.raises(ValueError, match="'scaled_adamw' needs LoRA factor pairs but none were found"):
        build_optimizer(tiny_llama(), "scaled_adamw", lr=1e-3)
    opt = build_optimizer(tiny_llama(), "adamw", lr=1e-3)  # the unscaled one is fine
    assert isinstance(opt, torch.optim.Optimizer)
