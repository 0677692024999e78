"""The fast optimizers against the float64 reference, torch's AdamW/SGD, and their contracts."""

import copy

import pytest
import torch

from core import NonFiniteGradientError, ScaledAdamW, ScaledGD, build_optimizer, find_lora_pairs
from core.reference import ReferenceScaledAdamW, ReferenceScaledGD
from _tiny import MixedModel, tiny_peft_llama

TOKENS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


def llama_loss(model):
    return model(input_ids=TOKENS, labels=TOKENS).loss


def mixed_loss(model, dtype=torch.float32):
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(7)).to(dtype)
    y = torch.arange(8) % 2
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def run_side_by_side(model, loss_fn, fast, reference_cls, steps, **hparams):
    """Train ``model`` with ``fast``; feed the same gradients to the reference on a copy; return both models."""
    twin = copy.deepcopy(model)
    pairs = find_lora_pairs(twin)
    paired = {id(t) for p in pairs for t in (p.A, p.B)}
    plain = [p for p in twin.parameters() if p.requires_grad and id(p) not in paired]
    reference = reference_cls(pairs, plain, **hparams)
    src = [p for p in model.parameters() if p.requires_grad]
    dst = [p for p in twin.parameters() if p.requires_grad]
    for _ in range(steps):
        fast.zero_grad()
        loss_fn(model).backward()
        for s, d in zip(src, dst):
            d.grad = s.grad.clone()
        fast.step()
        reference.step()
    return src, dst


@pytest.mark.parametrize(
    "name, reference_cls, hparams",
    [
        ("scaled_adamw", ReferenceScaledAdamW, dict(lr=5e-3, betas=(0.7, 0.8), weight_decay=0.01, reg=1e-6)),
        ("adamw", ReferenceScaledAdamW, dict(lr=5e-3, betas=(0.9, 0.999), weight_decay=0.01)),
        ("scaled_gd", ReferenceScaledGD, dict(lr=2e-2, weight_decay=0.01, reg=1e-6)),
        ("sgd", ReferenceScaledGD, dict(lr=5e-2, weight_decay=0.0)),
    ],
)
def test_fast_matches_reference_for_many_steps_on_a_peft_model(name, reference_cls, hparams):
    model = tiny_peft_llama()
    fast = build_optimizer(model, name, **hparams)
    ref_kwargs = dict(hparams, precondition=name.startswith("scaled"))
    src, dst = run_side_by_side(model, llama_loss, fast, reference_cls, steps=40, **ref_kwargs)
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d, rtol=2e-4, atol=2e-5)
    assert any(not torch.equal(s, d0) for s, d0 in zip(src, [p for p in tiny_peft_llama().parameters() if p.requires_grad]))


def test_fast_matches_reference_with_merged_blocks_plain_params_and_no_bias_correction():
    model = MixedModel()
    fast = build_optimizer(model, "scaled_adamw", lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, reg=1e-4,
                           bias_correction=False)
    src, dst = run_side_by_side(model, mixed_loss, fast, ReferenceScaledAdamW, steps=40, lr=1e-2,
                                betas=(0.8, 0.9), weight_decay=0.1, reg=1e-4, bias_correction=False)
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d, rtol=2e-4, atol=2e-5)


def test_reg_zero_from_peft_zero_init_runs_and_matches_reference():
    model = tiny_peft_llama(init_B=False)  # B = 0: the Gram BᵀB is singular at step 0
    fast = build_optimizer(model, "scaled_gd", lr=0.1, reg=0.0)
    src, dst = run_side_by_side(model, llama_loss, fast, ReferenceScaledGD, steps=5, lr=0.1, reg=0.0)
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-5)
    pair = find_lora_pairs(model)[0]
    assert pair.B.abs().sum() > 0  # B moved off zero


def assert_same_training(name, torch_cls, steps, ours_kwargs, torch_kwargs):
    """Train a model with core's optimizer ``name`` and a copy with ``torch_cls``; the parameters must agree."""
    model = MixedModel()
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, name, **ours_kwargs)
    theirs = torch_cls([p for p in twin.parameters() if p.requires_grad], **torch_kwargs)
    for _ in range(steps):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            mixed_loss(m).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_unscaled_adamw_equals_torch_adamw(fused):
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    assert_same_training("adamw", torch.optim.AdamW, 20, dict(hp, fused=fused), dict(hp, foreach=True))


def test_unscaled_sgd_equals_torch_sgd_with_momentum():
    hp = dict(lr=0.05, momentum=0.9)
    assert_same_training("sgd", torch.optim.SGD, 15, hp, hp)


def test_fused_kernel_gets_contiguous_gradients():
    # torch 2.13's CPU fused AdamW mis-reads non-contiguous gradients; the optimizer must hand it contiguous ones.
    w = torch.nn.Parameter(torch.randn(6, 4))
    w_ref = torch.nn.Parameter(w.detach().clone())
    ours = ScaledAdamW([w], lr=0.1, precondition=False, fused=True)
    theirs = torch.optim.AdamW([w_ref], lr=0.1, foreach=False)
    for step in range(5):
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(step)).T  # non-contiguous
        w.grad, w_ref.grad = g, g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)


def test_step_does_not_modify_grad():
    model = tiny_peft_llama()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-3)
    llama_loss(model).backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.step()
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing():
    model = MixedModel()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-3)
    mixed_loss(model).backward()
    model.l2.lora_up.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient.*l2\.lora_up\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reg=-1e-3), r"reg must be a number >= 0, got -0.001"),
        (dict(lr=-1.0), r"lr must be a number >= 0, got -1.0"),
        (dict(betas=(0.9, 1.5)), r"betas must be two numbers in \[0, 1\), got \(0.9, 1.5\)"),
        (dict(betaz=0.9), r"unknown hyperparameter\(s\) \['betaz'\] for optimizer 'scaled_adamw'"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(MixedModel(), "scaled_adamw", **kwargs)


def test_unknown_optimizer_and_reg_for_unscaled_are_errors():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; expected one of \['sgd', 'scaled_gd'"):
        build_optimizer(MixedModel(), "adam", lr=1e-3)
    with pytest.raises(ValueError, match=r"\['reg'\] for optimizer 'sgd'"):
        build_optimizer(MixedModel(), "sgd", lr=1e-3, reg=1e-6)


def test_group_overrides_give_sub_modules_their_own_lr_and_reg():
    a, b = MixedModel(seed=0), MixedModel(seed=1)
    opt = build_optimizer({"unet": a, "text_encoder": b}, "scaled_adamw", lr=1e-4, reg=0.0,
                          group_overrides={"text_encoder": {"lr": 1e-2, "reg": 1e6}})
    assert len(opt.param_groups) == 2
    by_lr = {g["lr"]: g for g in opt.param_groups}
    assert by_lr[1e-2]["reg"] == 1e6 and by_lr[1e-4]["reg"] == 0.0
    assert all(n.startswith("text_encoder.") for n in by_lr[1e-2]["param_names"])
    assert len(by_lr[1e-2]["pairs"]) == 3
    with pytest.raises(ValueError, match="group_overrides key 'vae' matches no trainable parameter"):
        build_optimizer({"unet": a}, "scaled_adamw", lr=1e-4, group_overrides={"vae": {"lr": 1.0}})


def test_optimizer_classes_take_explicit_pairs():
    model = MixedModel()
    pairs = find_lora_pairs(model)
    opt = ScaledGD([{"lora_pairs": pairs, "params": list(model.head.parameters())}], lr=0.1, reg=1e-4)
    assert opt.param_groups[0]["pairs"] == [[0, 1, 1], [2, 3, 1], [4, 5, 2]]
    opt2 = ScaledAdamW(pairs, lr=1e-3)  # a bare list of pairs is one group
    assert len(opt2.param_groups[0]["params"]) == 6
    with pytest.raises(ValueError, match="appear in more than one parameter group"):
        ScaledAdamW([{"lora_pairs": pairs}, {"params": [pairs[0].A]}], lr=1e-3)


@pytest.mark.parametrize("name", ["scaled_adamw", "scaled_gd"])
def test_state_dict_resume_is_bit_identical(name, tmp_path):
    hp = dict(lr=1e-2, reg=1e-6, weight_decay=0.01) | ({"momentum": 0.9} if name == "scaled_gd" else {})

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            mixed_loss(model).backward()
            opt.step()

    straight = MixedModel()
    opt = build_optimizer(straight, name, **hp)
    train(straight, opt, 10)

    resumed = MixedModel()
    opt_a = build_optimizer(resumed, name, **hp)
    train(resumed, opt_a, 4)
    torch.save({"model": resumed.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    fresh = MixedModel(seed=123)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    opt_b = build_optimizer(fresh, name, **hp)
    opt_b.load_state_dict(ckpt["opt"])
    train(fresh, opt_b, 6)
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(dtype):
    model = MixedModel().to(dtype)
    reference = MixedModel().to(dtype)
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2, reg=1e-6)
    x = torch.randn(8, 12).to(dtype)
    for _ in range(5):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(s["exp_avg"].dtype == dtype for s in opt.state.values())
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()) if a.requires_grad]
    assert all(moved) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("stack_max_numel", [0, 1 << 30], ids=["one-product-per-pair", "stacked"])
@pytest.mark.parametrize("name, reference_cls", [("scaled_adamw", ReferenceScaledAdamW), ("scaled_gd", ReferenceScaledGD)])
def test_both_bucket_strategies_match_the_reference(monkeypatch, stack_max_numel, name, reference_cls):
    # small factors are stacked (batched products), large ones get a product each: both must be the same algorithm
    import core.optimizers

    monkeypatch.setattr(core.optimizers, "STACK_MAX_NUMEL", stack_max_numel)
    hp = dict(lr=1e-2, weight_decay=0.05, reg=1e-4) | ({"betas": (0.8, 0.9)} if name == "scaled_adamw" else {})
    model = MixedModel()  # two down/up pairs, a merged two-block pair, a plain head
    fast = build_optimizer(model, name, **hp)
    src, dst = run_side_by_side(model, mixed_loss, fast, reference_cls, steps=25, **hp)
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d, rtol=2e-4, atol=2e-5)
    assert all(b.stacked == bool(stack_max_numel) for plan in fast._plan_cache.values() for b in plan.buckets)


@pytest.mark.parametrize("stack_max_numel", [0, 1 << 30], ids=["one-product-per-pair", "stacked"])
def test_both_bucket_strategies_handle_bf16_factors(monkeypatch, stack_max_numel):
    import core.optimizers

    monkeypatch.setattr(core.optimizers, "STACK_MAX_NUMEL", stack_max_numel)
    model = MixedModel().to(torch.bfloat16)
    twin = copy.deepcopy(model).float()
    ours = build_optimizer(model, "scaled_gd", lr=1e-2, reg=1e-3)
    mixed_loss_bf16 = lambda m: mixed_loss(m, dtype=torch.bfloat16)  # noqa: E731
    mixed_loss_bf16(model).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.float()
    reference = ReferenceScaledGD(find_lora_pairs(twin), list(twin.head.parameters()), lr=1e-2, reg=1e-3)
    ours.step()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def test_step_counters_follow_torch_adamw_when_some_gradients_are_missing():
    # a parameter without a gradient is not stepped (as in torch); the counters advance together only when they should
    model = MixedModel()
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.01)
    theirs = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    for step in range(9):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            mixed_loss(m).backward()
            if step % 3 == 1:
                m.head.weight.grad = None
            if step == 4:
                m.l1.lora_down.weight.grad = None
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.requires_grad:
            assert ours.state[p]["step"].dtype == torch.float32 and ours.state[p]["step"].dim() == 0
            assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"])
    assert float(ours.state[model.head.weight]["step"]) == 6 and float(ours.state[model.l2.lora_up.weight]["step"]) == 9


def test_huge_but_finite_directions_are_not_mistaken_for_non_finite():
    # the finiteness check sums the directions; a sum that overflows is confirmed element-wise before raising
    model = MixedModel()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-3, reg=1.0)
    mixed_loss(model).backward()
    model.l1.lora_down.weight.grad.fill_(2e37)
    model.head.bias.grad.fill_(3e38)  # a plain parameter: its norm overflows
    B = model.l1.lora_up.weight.detach()
    direction = torch.linalg.solve(B.T @ B + torch.eye(3), model.l1.lora_down.weight.grad)
    assert torch.isfinite(direction).all() and not torch.isfinite(direction.sum())
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_finite_gradient_with_a_non_finite_direction_is_a_clear_error():
    # reg = 0 and a tiny partner: (BᵀB)⁻¹ is huge, and a large but finite gradient overflows
    model = MixedModel()
    with torch.no_grad():
        model.l1.lora_up.weight.mul_(1e-3)
    opt = build_optimizer(model, "scaled_gd", lr=1e-3, reg=0.0)
    mixed_loss(model).backward()
    model.l1.lora_down.weight.grad.fill_(1e35)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match=r"direction of 1 parameter\(s\) is not finite although the "
                       r"gradient is: l1\.lora_down\.weight; .*raise reg above 0"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("stack_max_numel", [0, 1 << 30], ids=["one-product-per-pair", "stacked"])
def test_non_finite_gradient_in_either_bucket_strategy_raises_and_changes_nothing(monkeypatch, stack_max_numel):
    import core.optimizers

    monkeypatch.setattr(core.optimizers, "STACK_MAX_NUMEL", stack_max_numel)
    model = MixedModel()
    opt = build_optimizer(model, "scaled_gd", lr=1e-2, momentum=0.9)
    for bad in ("merged.lora_A", "head.bias"):
        opt.zero_grad()
        mixed_loss(model).backward()
        model.get_parameter(bad).grad[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(NonFiniteGradientError, match=rf"1 parameter\(s\): {bad}"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state
