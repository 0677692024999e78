"""The fast optimizers against their float64 reference twins and torch's AdamW/SGD, and their contracts."""

import copy
import inspect
import itertools

import pytest
import torch
from torch import nn

import core.preconditioner
from core import (
    NonFiniteGradientError, ScaledAdamW, ScaledAdamWReference, ScaledGD, ScaledGDReference, build_optimizer,
    find_lora_pairs,
)  # fmt: skip
from _tiny import MixedModel, tiny_peft_llama

TOKENS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


class ConvLora(nn.Module):
    """Diffusion-style conv LoRA: a 3 x 3 ``lora_down`` and a 1 x 1 ``lora_up`` beside a frozen convolution."""

    def __init__(self, channels: int, r: int):
        super().__init__()
        self.base = nn.Conv2d(channels, channels, 3, padding=1)
        self.base.requires_grad_(False)
        self.lora_down = nn.Conv2d(channels, r, 3, padding=1, bias=False)
        self.lora_up = nn.Conv2d(r, channels, 1, bias=False)
        nn.init.normal_(self.lora_up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x))


class EveryKindModel(nn.Module):
    """MixedModel (two down/up pairs, a merged two-block pair, a head) behind a conv pair and a plain scale."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.mixed = MixedModel(seed=seed)
        self.conv = ConvLora(3, 2)
        self.scale = nn.Parameter(torch.ones(12))

    def forward(self, x):
        return self.mixed(self.scale * (x + self.conv(x.view(-1, 3, 2, 2)).flatten(1)))


def every_kind_loss(model, dtype=torch.float32):
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(7)).to(dtype)
    return nn.functional.cross_entropy(model(x).float(), torch.arange(8) % 2)


def mixed_loss(model, dtype=torch.float32):
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(7)).to(dtype)
    return nn.functional.cross_entropy(model(x).float(), torch.arange(8) % 2)


def two_groups(model: EveryKindModel, **second) -> list[dict]:
    """Every kind of parameter over two groups; the second with its own settings."""
    pairs = {p.name: p for p in find_lora_pairs(model)}
    head = model.mixed.head
    return [
        {"lora_pairs": [pairs["mixed.l1"], pairs["mixed.merged"]], "params": [head.weight, head.bias],
         "param_names": ["mixed.head.weight", "mixed.head.bias"]},
        {"lora_pairs": [pairs["mixed.l2"], pairs["conv"]], "params": [model.scale], "param_names": ["scale"],
         **second},
    ]  # fmt: skip


def train_side_by_side(model, fast, twin, reference, loss_fn, steps, drop_grads=False):
    """Step ``fast`` on ``model`` and ``reference`` on ``twin`` with identical gradients (some dropped at times)."""
    src = [p for p in model.parameters() if p.requires_grad]
    dst = [p for p in twin.parameters() if p.requires_grad]
    for step in range(steps):
        fast.zero_grad()
        loss_fn(model).backward()
        if drop_grads and step % 5 == 3:
            src[-1].grad = None  # a plain parameter without a gradient
        if drop_grads and step == 7:
            src[0].grad = None  # a LoRA factor whose partner still has one
        for s, d in zip(src, dst):
            d.grad = None if s.grad is None else s.grad.clone()
        fast.step()
        reference.step()
    return src, dst


def assert_trained_alike(src, dst, initial, rtol=2e-4, atol=2e-5):
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d, rtol=rtol, atol=atol)
    assert all(not torch.equal(s, i) for s, i in zip(src, initial))  # every parameter moved


ADAMW_OPTIONS = list(itertools.product(["gradient", "update"], [True, False], [True, False], [0.0, 0.1], [0.0, 1e-4]))
GD_OPTIONS = list(itertools.product([0.0, 0.9], [True, False], [0.0, 0.1], [0.0, 1e-4]))


@pytest.mark.parametrize("variant, bias_correction, precondition, weight_decay, reg", ADAMW_OPTIONS)
def test_scaled_adamw_matches_its_reference_twin_for_every_option(variant, bias_correction, precondition,
                                                                   weight_decay, reg):  # fmt: skip
    hp = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-8, weight_decay=weight_decay, reg=reg,
              bias_correction=bias_correction, variant=variant, precondition=precondition)  # fmt: skip
    model = EveryKindModel()
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    second = dict(lr=5e-3, reg=reg * 10, weight_decay=weight_decay / 2)
    fast = ScaledAdamW(two_groups(model, **second), **hp)
    reference = ScaledAdamWReference(two_groups(twin, **second), **hp)
    src, dst = train_side_by_side(model, fast, twin, reference, every_kind_loss, steps=25, drop_grads=True)
    assert_trained_alike(src, dst, initial)


@pytest.mark.parametrize("momentum, precondition, weight_decay, reg", GD_OPTIONS)
def test_scaled_gd_matches_its_reference_twin_for_every_option(momentum, precondition, weight_decay, reg):
    hp = dict(lr=2e-2, momentum=momentum, weight_decay=weight_decay, reg=reg, precondition=precondition)
    model = EveryKindModel()
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    second = dict(lr=1e-2, reg=reg * 10, weight_decay=weight_decay / 2)
    fast = ScaledGD(two_groups(model, **second), **hp)
    reference = ScaledGDReference(two_groups(twin, **second), **hp)
    src, dst = train_side_by_side(model, fast, twin, reference, every_kind_loss, steps=25, drop_grads=True)
    assert_trained_alike(src, dst, initial)


def reference_twin(name, twin, **hp):
    """The reference of ``build_optimizer(twin, name, **hp)``, over the very groups build_optimizer makes."""
    groups = build_optimizer(twin, name, **hp).param_groups
    cls = ScaledGDReference if name in ("sgd", "scaled_gd") else ScaledAdamWReference
    return cls(groups, precondition=name.startswith("scaled_"), **hp)


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("scaled_adamw", dict(lr=5e-3, betas=(0.7, 0.8), weight_decay=0.01, reg=1e-6)),
        ("scaled_adamw", dict(lr=5e-3, betas=(0.7, 0.8), weight_decay=0.01, reg=1e-6, variant="update")),
        ("adamw", dict(lr=5e-3, betas=(0.9, 0.999), weight_decay=0.01)),
        ("scaled_gd", dict(lr=2e-2, weight_decay=0.01, reg=1e-6)),
        ("sgd", dict(lr=5e-2, momentum=0.9)),
    ],
)
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("embed_tokens", "q_proj")], ids=["linear", "embedding"])
def test_build_optimizer_matches_the_reference_for_many_steps_on_a_peft_model(name, hparams, targets):
    model = tiny_peft_llama(targets=targets)
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    fast = build_optimizer(model, name, **hparams)
    reference = reference_twin(name, twin, **hparams)
    loss = lambda m: m(input_ids=TOKENS, labels=TOKENS).loss  # noqa: E731
    src, dst = train_side_by_side(model, fast, twin, reference, loss, steps=40)
    assert_trained_alike(src, dst, initial)


def test_reg_zero_from_peft_zero_init_runs_and_matches_reference():
    model = tiny_peft_llama(init_B=False)  # B = 0: the Gram BᵀB is singular at step 0
    twin = copy.deepcopy(model)
    fast = build_optimizer(model, "scaled_gd", lr=0.1, reg=0.0)
    reference = reference_twin("scaled_gd", twin, lr=0.1, reg=0.0)
    loss = lambda m: m(input_ids=TOKENS, labels=TOKENS).loss  # noqa: E731
    src, dst = train_side_by_side(model, fast, twin, reference, loss, steps=5)
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-5)
    assert find_lora_pairs(model)[0].B.abs().sum() > 0  # B moved off zero


def test_reference_twins_take_the_constructors_of_the_fast_classes():
    for fast, reference in ((ScaledGD, ScaledGDReference), (ScaledAdamW, ScaledAdamWReference)):
        assert inspect.signature(reference) == inspect.signature(fast)
    model = MixedModel()
    reference = ScaledAdamWReference(find_lora_pairs(model), lr=1e-2)
    mixed_loss(model).backward()
    reference.step()
    pair = find_lora_pairs(model)[0]
    assert reference.state[pair.A]["master"].dtype == torch.float64
    assert torch.equal(pair.A, reference.state[pair.A]["master"].float())
    with pytest.raises(ValueError, match=r"variant must be one of \['gradient', 'update'\], got 'adam'"):
        ScaledAdamWReference(find_lora_pairs(model), variant="adam")


def test_the_two_variants_differ_when_preconditioned_and_agree_when_not():
    def train(variant, precondition):
        model = MixedModel()
        groups = [{"lora_pairs": find_lora_pairs(model), "params": list(model.head.parameters())}]
        opt = ScaledAdamW(groups, lr=1e-2, variant=variant, precondition=precondition)
        for _ in range(5):
            opt.zero_grad()
            mixed_loss(model).backward()
            opt.step()
        return [p.detach() for p in model.parameters() if p.requires_grad]

    gradient, update = train("gradient", True), train("update", True)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(gradient, update))
    for a, b in zip(train("gradient", False), train("update", False)):  # both are AdamW then
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_update_variant_first_step_is_the_preconditioned_sign_of_the_gradient():
    # at step 1, m̂ = g and v̂ = g², so u = g / (|g| + eps), and d_A = (BᵀB + reg I)⁻¹ u_A
    model = MixedModel()
    pair = find_lora_pairs(model)[0]
    A0, B0 = pair.A.detach().clone(), pair.B.detach().clone()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-3, weight_decay=0.0, reg=0.1, eps=1e-8, variant="update")
    mixed_loss(model).backward()
    g = pair.A.grad.clone()
    opt.step()
    u = g / (g.abs() + 1e-8)
    expected = A0 - 1e-3 * torch.linalg.solve(B0.T @ B0 + 0.1 * torch.eye(B0.shape[1]), u)
    torch.testing.assert_close(pair.A.detach(), expected, rtol=1e-5, atol=1e-7)


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
    # torch's CPU fused AdamW mis-reads non-contiguous gradients; the optimizer must hand it contiguous ones.
    w = nn.Parameter(torch.randn(6, 4))
    w_ref = nn.Parameter(w.detach().clone())
    ours = ScaledAdamW([w], lr=0.1, precondition=False, fused=True)
    theirs = torch.optim.AdamW([w_ref], lr=0.1, foreach=False)
    for step in range(5):
        g = torch.randn(4, 6, generator=torch.Generator().manual_seed(step)).T  # non-contiguous
        w.grad, w_ref.grad = g, g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["gradient", "update"])
def test_step_does_not_modify_grad(variant):
    model = tiny_peft_llama()
    opt = build_optimizer(model, "scaled_adamw", lr=1e-3, variant=variant)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.step()
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name, hp", [("scaled_adamw", {}), ("scaled_adamw", {"variant": "update"}),
                                      ("scaled_adamw", {"bias_correction": False}), ("scaled_gd", {"momentum": 0.9})])
def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing(name, hp):
    model = MixedModel()
    opt = build_optimizer(model, name, lr=1e-3, **hp)
    for bad in ("l2.lora_up.weight", "merged.lora_A", "head.bias"):
        opt.zero_grad()
        mixed_loss(model).backward()
        model.get_parameter(bad).grad[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(NonFiniteGradientError, match=rf"non-finite gradient.*1 parameter\(s\): {bad}"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reg=-1e-3), r"reg must be a number >= 0, got -0.001"),
        (dict(lr=-1.0), r"lr must be a number >= 0, got -1.0"),
        (dict(betas=(0.9, 1.5)), r"betas must be two numbers in \[0, 1\), got \(0.9, 1.5\)"),
        (dict(variant="theorem"), r"variant must be one of \['gradient', 'update'\], got 'theorem'"),
        (dict(betaz=0.9), r"unknown hyperparameter\(s\) \['betaz'\] for optimizer 'scaled_adamw'"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(MixedModel(), "scaled_adamw", **kwargs)


def test_unknown_optimizer_and_reg_or_variant_for_unscaled_are_errors():
    for name in ("adam", "peft_riemannian"):  # the peers are built outside core
        with pytest.raises(ValueError, match=rf"unknown optimizer '{name}'; expected one of \['sgd', 'scaled_gd'"):
            build_optimizer(MixedModel(), name, lr=1e-3)
    with pytest.raises(ValueError, match=r"\['reg'\] for optimizer 'sgd'"):
        build_optimizer(MixedModel(), "sgd", lr=1e-3, reg=1e-6)
    with pytest.raises(ValueError, match=r"\['variant'\] for optimizer 'adamw'"):
        build_optimizer(MixedModel(), "adamw", lr=1e-3, variant="update")


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


@pytest.mark.parametrize("name, hp", [("scaled_adamw", {}), ("scaled_adamw", {"variant": "update"}),
                                      ("scaled_adamw", {"bias_correction": False}), ("scaled_gd", {"momentum": 0.9})])
def test_state_dict_resume_is_bit_identical(name, hp, tmp_path):
    hp = dict(lr=1e-2, reg=1e-6, weight_decay=0.01, **hp)

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
    if name == "scaled_adamw":
        state = opt_b.state[fresh.l1.lora_up.weight]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and float(state["step"]) == 10


@pytest.mark.parametrize("variant", ["gradient", "update"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train(dtype, variant):
    model = MixedModel().to(dtype)
    reference = MixedModel().to(dtype)
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2, reg=1e-6, variant=variant)
    x = torch.randn(8, 12).to(dtype)
    for _ in range(5):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(s["exp_avg"].dtype == dtype for s in opt.state.values())
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()) if a.requires_grad]
    assert all(moved) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture(params=[0, 1 << 30], ids=["one-product-per-pair", "stacked"])
def bucket_strategy(request, monkeypatch):
    """Force one of the batched preconditioner's two strategies; yields the buckets it builds."""
    monkeypatch.setattr(core.preconditioner, "STACK_MAX_NUMEL", request.param)
    built, make = [], core.preconditioner._buckets

    def recording(*args):
        buckets = make(*args)
        built.extend(buckets)
        return buckets

    monkeypatch.setattr(core.preconditioner, "_buckets", recording)
    yield bool(request.param), built


@pytest.mark.parametrize("name", ["scaled_adamw", "scaled_gd"])
def test_both_bucket_strategies_match_the_reference(bucket_strategy, name):
    stacked, built = bucket_strategy
    hp = dict(lr=1e-2, weight_decay=0.05, reg=1e-4) | ({"betas": (0.8, 0.9)} if name == "scaled_adamw" else {})
    model = EveryKindModel()
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    fast = ScaledAdamW(two_groups(model), **hp) if name == "scaled_adamw" else ScaledGD(two_groups(model), **hp)
    cls = ScaledAdamWReference if name == "scaled_adamw" else ScaledGDReference
    src, dst = train_side_by_side(model, fast, twin, cls(two_groups(twin), **hp), every_kind_loss, 25, True)
    assert_trained_alike(src, dst, initial)
    assert built and all(b.stacked == stacked for b in built)


def test_both_bucket_strategies_handle_bf16_factors(bucket_strategy):
    model = MixedModel().to(torch.bfloat16)
    twin = copy.deepcopy(model).float()
    ours = build_optimizer(model, "scaled_gd", lr=1e-2, reg=1e-3)
    mixed_loss(model, dtype=torch.bfloat16).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.float()
    reference = reference_twin("scaled_gd", twin, lr=1e-2, reg=1e-3)
    ours.step()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def test_step_counters_follow_torch_adamw_when_some_gradients_are_missing():
    # a parameter without a gradient is not stepped (as in torch)
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


def test_finite_gradient_with_a_non_finite_direction_is_a_clear_error(bucket_strategy):
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


def test_sparse_gradients_are_a_clear_error():
    w = nn.Parameter(torch.randn(4, 3))
    opt = ScaledAdamW([{"params": [w], "param_names": ["embedding.weight"]}], precondition=False)
    w.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(ValueError, match=r"sparse gradients are not supported \(parameter 'embedding.weight'\)"):
        opt.step()
