"""LoRA-RITE's own options pass through harness.build_optimizer and the optim/lora_rite.yaml configs."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from _tiny import tiny_peft_llama
from harness import build_optimizer
from harness.peers import LORA_RITE_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "GPT-2/conf/optim/lora_rite.yaml", ROOT / "Mistral-7B/conf/optim/lora_rite.yaml"]


def _one_step(**hparams):
    model = tiny_peft_llama()
    opt = build_optimizer(model, "lora_rite", **hparams)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    return opt, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_options_reach_the_lora_group():
    options = {"relative_epsilon": True, "clip_unmagnified_grad": 0.5, "update_capping": 0.1, "update_skipping": 0.0,
               "apply_escape": True, "balance_param": True}  # fmt: skip
    opt, _ = _one_step(lr=1e-3, **options)
    group = next(g for g in opt.param_groups if g.get("lora", True))
    assert {k: group[k] for k in options} == options
    assert opt.helper.maybe_inf_to_nan is True  # the default, kept by the helper rather than the group


def test_an_option_changes_the_step():
    _, plain = _one_step(lr=1e-2)
    _, balanced = _one_step(lr=1e-2, balance_param=True)
    lora = [n for n in plain if "lora_" in n]
    assert lora and any(not torch.allclose(plain[n], balanced[n]) for n in lora)


def test_layout_and_unknown_keys_are_errors():
    model = tiny_peft_llama()
    with pytest.raises(ValueError, match=r"\['lora_l_dim'\] cannot be set for 'lora_rite'"):
        build_optimizer(model, "lora_rite", lr=1e-3, lora_l_dim=1)
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['update_caping'\] for optimizer 'lora_rite'"):
        build_optimizer(model, "lora_rite", lr=1e-3, update_caping=0.1)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parts[-4])
def test_configs_name_every_option_and_build(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert LORA_RITE_OPTIONS <= set(cfg)
    opt = build_optimizer(tiny_peft_llama(), **cfg)
    group = next(g for g in opt.param_groups if g.get("lora", True))
    assert all(group[k] == cfg[k] for k in LORA_RITE_OPTIONS - {"maybe_inf_to_nan"})
