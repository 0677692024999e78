"""What the optimizers refuse, and when: construction (no silently unscaled optimizer, swapped pairs, bad
hyperparameters), each step (factors that no longer chain, non-finite factors), load_state_dict (type, groups,
pairing, every state tensor), and float16 parameters, which train like float32 ones."""

import copy

import pytest
import torch
from torch import nn

import core.preconditioner
from core.sharded import FlattenedParameterError
from core import (
    LoraPairingError, NonFiniteGradientError, ScaledAdamW, ScaledGD, build_optimizer, find_lora_pairs,
    preconditioned_directions,
)  # fmt: skip
from _tiny import LoraDownUp, MixedModel, tiny_peft_llama

X = torch.randn(32, 12, generator=torch.Generator().manual_seed(7))
Y = torch.arange(32) % 2


class TwoLayers(nn.Module):
    """Two diffusion-style LoRA layers of rank ``r`` and a trainable head (no merged layer)."""

    def __init__(self, r: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = LoraDownUp(12, 12, r), LoraDownUp(12, 12, r)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def loss_of(model, dtype=torch.float32):
    return nn.functional.cross_entropy(model(X.to(dtype)).float(), Y)


def train(model, opt, steps, dtype=torch.float32):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, dtype)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# -- never silently unscaled -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ScaledAdamW, ScaledGD])
def test_plain_parameters_under_a_scaled_optimizer_are_an_error_saying_how_to_pass_pairs(cls):
    model = TwoLayers()
    with pytest.raises(ValueError, match=rf"{cls.__name__} got 10 parameter\(s\) in 1 group\(s\) but no LoRA pairs.*"
                       r"core\.find_lora_pairs\(model\).*model\.named_parameters\(\).*core\.build_optimizer"):
        cls(model.parameters(), lr=1e-3)
    plain = cls(trainable(model), lr=1e-3, precondition=False)  # the plain optimizer on purpose still works
    before = [p.detach().clone() for p in trainable(model)]
    train(model, plain, 1)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable(model)))


def test_transformers_trainers_two_plain_decay_groups_are_an_error(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=tiny_peft_llama(), args=args, optimizer_cls_and_kwargs=(ScaledAdamW, {"lr": 1e-3}))
    with pytest.raises(ValueError, match=r"ScaledAdamW got 8 parameter\(s\) in 2 group\(s\) but no LoRA pairs"):
        trainer.create_optimizer()


@pytest.mark.parametrize("name", ["scaled_adamw", "scaled_gd"])
def test_named_parameters_are_paired_by_name_like_build_optimizer(name):
    model, twin = TwoLayers(), TwoLayers()
    hp = dict(lr=1e-2, weight_decay=0.01, reg=1e-4)
    cls = ScaledAdamW if name == "scaled_adamw" else ScaledGD
    named = cls(model.named_parameters(), **hp)
    built = build_optimizer(twin, name, **hp)
    # the parameters keep their places (frozen ones too, as in torch): l1.lora_down is 2, after l1.base.weight/bias
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert named.param_groups[0]["pairs"] == [[2, 3, 1], [6, 7, 1]]
    assert built.param_groups[0]["pairs"] == [[0, 1, 1], [2, 3, 1]]
    train(model, named, 5)
    train(twin, built, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    plain = cls(TwoLayers().named_parameters(), precondition=False, lr=1e-2)  # named but plain: no pairing
    assert plain.param_groups[0]["pairs"] == []


def test_named_parameters_in_groups_and_without_any_lora_names():
    model = TwoLayers()
    named = dict(model.named_parameters())
    opt = ScaledAdamW([{"params": [(n, named[n]) for n in ("l1.lora_down.weight", "l1.lora_up.weight")]},
                       {"params": [(n, named[n]) for n in ("head.weight", "head.bias")], "lr": 0.1}], lr=1e-3)
    assert [g["pairs"] for g in opt.param_groups] == [[[0, 1, 1]], []]
    with pytest.raises(ValueError, match="no LoRA pairs"):
        ScaledAdamW(nn.Linear(3, 2).named_parameters())
    with pytest.raises(LoraPairingError, match=r"unpaired LoRA factor in module 'l1'"):
        ScaledAdamW([("l1.lora_down.weight", named["l1.lora_down.weight"]), ("head.bias", named["head.bias"])])
    # a merged loralib layer needs its module's enable_lora: by name alone its blocks do not chain, never silently
    with pytest.raises(LoraPairingError, match=r"LoRA pair 'merged': shapes do not chain"):
        ScaledAdamW(MixedModel().named_parameters())


def test_groups_without_pairs():
    model = TwoLayers()
    pairs = find_lora_pairs(model)
    with pytest.raises(ValueError, match=r"parameter group 1 has an empty 'lora_pairs' list and no 'params'"):
        ScaledAdamW([{"lora_pairs": pairs}, {"lora_pairs": []}])
    with pytest.raises(ValueError, match="no LoRA pairs"):
        ScaledGD([{"lora_pairs": [], "params": list(model.head.parameters())}])
    # plain parameters in a group of their own beside a group with pairs: allowed (e.g. a head with its own lr)
    opt = ScaledAdamW([{"lora_pairs": pairs}, {"lora_pairs": [], "params": list(model.head.parameters()), "lr": 0.1}])
    train(model, opt, 2)
    empty = ScaledAdamW([{"params": trainable(model)}, {"params": []}], precondition=False)  # Trainer's empty group
    train(model, empty, 1)


@pytest.mark.parametrize("name", ["scaled_adamw", "scaled_gd"])
def test_factors_that_no_longer_chain_at_step_time_are_an_error_naming_the_pair(name):
    model = TwoLayers()
    opt = build_optimizer(model, name, lr=1e-3)
    train(model, opt, 1)
    loss_of(model).backward()
    factor = model.l2.lora_down.weight
    factor.data, factor.grad = factor.data.flatten(), factor.grad.flatten()  # what a flattening engine does
    before = [p.detach().clone() for p in trainable(model)]
    with pytest.raises(FlattenedParameterError, match=r"LoRA factor 'l2\.lora_down\.weight' has shape \(36,\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainable(model)))


def test_a_pair_given_in_the_wrong_order_is_detected():
    square = TwoLayers()
    A, B = square.l1.lora_down.weight, square.l1.lora_up.weight  # (3, 12), (12, 3): (B, A) chains as rank 12
    with pytest.raises(LoraPairingError, match=r"rank 12 .* exceeds the short side of the 3 x 3 update B @ A; the "
                       r"pair looks swapped"):
        ScaledGD([{"lora_pairs": [(B, A)]}], lr=1e-3)
    wide = LoraDownUp(12, 20, 3)  # A (3, 12), B (20, 3): (B, A) does not chain, and would chain the other way
    with pytest.raises(LoraPairingError, match=r"shapes do not chain.*the pair looks swapped"):
        ScaledAdamW([{"lora_pairs": [(wide.lora_up.weight, wide.lora_down.weight)]}])
    ScaledAdamW([{"lora_pairs": [(A, B), (wide.lora_down.weight, wide.lora_up.weight)]}])  # the right order


# -- hyperparameters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("scaled_adamw", dict(betas=0.9), r"betas must be two numbers in \[0, 1\), got 0.9"),
        ("scaled_adamw", dict(betas=(0.9, float("nan"))), r"betas must be two numbers in \[0, 1\), got \(0.9, nan\)"),
        ("scaled_adamw", dict(reg=float("inf")), r"reg must be a finite number >= 0, got inf"),
        ("scaled_adamw", dict(reg=float("nan")), r"reg must be a finite number >= 0, got nan"),
        ("scaled_adamw", dict(lr=float("inf")), r"lr must be a finite number >= 0, got inf"),
        ("scaled_adamw", dict(lr=float("nan")), r"lr must be a finite number >= 0, got nan"),
        ("scaled_adamw", dict(eps=-1e-8), r"eps must be a finite number >= 0, got -1e-08"),
        ("scaled_adamw", dict(eps=float("inf")), r"eps must be a finite number >= 0, got inf"),
        ("scaled_adamw", dict(weight_decay=float("nan")), r"weight_decay must be a finite number >= 0, got nan"),
        ("scaled_gd", dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0, got -0.1"),
        ("scaled_gd", dict(momentum=float("inf")), r"momentum must be a finite number >= 0, got inf"),
        ("scaled_gd", dict(momentum=-0.9), r"momentum must be a finite number >= 0, got -0.9"),
    ],
)
def test_bad_hyperparameters_are_clear_errors_quoting_the_value(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(TwoLayers(), name, **kwargs)
    cls = ScaledAdamW if name == "scaled_adamw" else ScaledGD
    with pytest.raises(ValueError, match=message):
        cls(find_lora_pairs(TwoLayers()), **kwargs)
    with pytest.raises(ValueError, match=message):  # a group's own value is checked alike
        build_optimizer({"m": TwoLayers()}, name, group_overrides={"m.l2": kwargs})


# -- load_state_dict -----------------------------------------------------------------------------------------------


def assert_unchanged(opt, before):
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for key, entry in before["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][key][k])) for k, v in entry.items())
    assert after["param_groups"] == before["param_groups"]


def test_a_state_saved_at_another_lora_rank_is_refused_before_anything_changes():
    saved_model = TwoLayers(r=4)
    saved_opt = build_optimizer(saved_model, "scaled_adamw", lr=1e-2)
    train(saved_model, saved_opt, 2)
    model = TwoLayers(r=8)
    opt = build_optimizer(model, "scaled_adamw", lr=3e-3)
    train(model, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter group 0, parameter 'l1\.lora_down\.weight': exp_avg has shape "
                       r"\(4, 12\), expected \(8, 12\)"):
        opt.load_state_dict(saved_opt.state_dict())
    assert_unchanged(opt, before)
    train(model, opt, 2)  # and it still trains
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_states_of_the_other_optimizer_type_are_refused():
    model = TwoLayers()
    adamw, gd = build_optimizer(model, "scaled_adamw", lr=1e-2), build_optimizer(model, "scaled_gd", lr=1e-2,
                                                                                   momentum=0.9)
    train(model, adamw, 1)
    train(model, gd, 1)
    with pytest.raises(ValueError, match=r"parameter group 0: the saved state is of an AdamW-type optimizer, not of "
                       r"ScaledGD: it lacks the hyperparameter\(s\) \['momentum'\]"):
        gd.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match=r"the saved state is of an SGD-type optimizer, not of ScaledAdamW: it lacks "
                       r"the hyperparameter\(s\) \['betas', 'bias_correction', 'eps', 'fused', 'variant'\]"):
        adamw.load_state_dict(gd.state_dict())
    sgd = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"has no 'pairs', so it is not a ScaledGD state"):
        gd.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=r"it has 1 parameter group\(s\), this ScaledAdamW has 2"):
        build_optimizer({"m": model}, "scaled_adamw", group_overrides={"m.head": {"lr": 0.1}}).load_state_dict(
            adamw.state_dict())


def test_a_state_with_another_pairing_is_refused_never_adopted():
    model = TwoLayers()
    pairs = find_lora_pairs(model)
    opt = ScaledAdamW([{"lora_pairs": pairs, "params": list(model.head.parameters())}], lr=1e-2)
    # the same tensors, the same count and shapes, but l2 as plain parameters
    other = ScaledAdamW([{"lora_pairs": pairs[:1], "params": [pairs[1].A, pairs[1].B, *model.head.parameters()]}])
    train(model, other, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter group 0: LoRA pair 1 differs: this optimizer has "
                       r"'l2\.lora_down\.weight' / 'l2\.lora_up\.weight' \[2, 3, 1\], the saved state none"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(opt, before)
    assert opt.param_groups[0]["pairs"] == [[0, 1, 1], [2, 3, 1]]


def test_state_tensors_of_another_dtype_or_with_unknown_entries_are_refused():
    saved_model = TwoLayers()
    saved = build_optimizer(saved_model, "scaled_adamw", lr=1e-2)
    train(saved_model, saved, 1)
    model = TwoLayers().to(torch.bfloat16)
    opt = build_optimizer(model, "scaled_adamw", lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter 'l1\.lora_down\.weight': exp_avg is torch\.float32, expected "
                       r"torch\.bfloat16 \(for a torch\.bfloat16 parameter\)"):
        opt.load_state_dict(saved.state_dict())
    state = saved.state_dict()
    state["state"][5]["max_exp_avg_sq"] = torch.zeros(2)  # head.bias
    with pytest.raises(ValueError, match=r"parameter 'head\.bias': the state has the entries \['exp_avg', "
                       r"'exp_avg_sq', 'max_exp_avg_sq', 'step'\].*unknown: \['max_exp_avg_sq'\]"):
        build_optimizer(TwoLayers(), "scaled_adamw", lr=1e-2).load_state_dict(state)
    state = saved.state_dict()
    state["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"the saved hyperparameters are invalid: lr must be a finite number >= 0"):
        build_optimizer(TwoLayers(), "scaled_adamw", lr=1e-2).load_state_dict(state)


def test_a_torch_adamw_state_loads_and_training_continues_as_torch_adamw_would():
    hp = dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.05)
    start = TwoLayers()
    first = torch.optim.AdamW(trainable(start), foreach=True, **hp)
    train(start, first, 3)
    saved = copy.deepcopy(first.state_dict())
    theirs, ours = copy.deepcopy(start), copy.deepcopy(start)
    resumed_torch = torch.optim.AdamW(trainable(theirs), foreach=True, lr=1.0)
    resumed_torch.load_state_dict(copy.deepcopy(saved))  # torch keeps the loaded tensors: one copy each
    resumed_ours = ScaledAdamW(trainable(ours), lr=1.0, precondition=False)
    resumed_ours.load_state_dict(copy.deepcopy(saved))
    assert resumed_ours.param_groups[0]["lr"] == 1e-2 and resumed_ours.param_groups[0]["betas"] == (0.8, 0.9)
    train(theirs, resumed_torch, 4)
    train(ours, resumed_ours, 4)
    for a, b in zip(theirs.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(resumed_ours.state[ours.head.bias]["step"]) == 7
    # into the preconditioned optimizer: the pairing is the current one, and it steps
    named = torch.optim.AdamW(start.named_parameters(), **hp)
    train(start, named, 1)
    scaled = ScaledAdamW(start.named_parameters(), lr=1.0, reg=1e-4)
    scaled.load_state_dict(named.state_dict())
    assert scaled.param_groups[0]["pairs"] == [[2, 3, 1], [6, 7, 1]] and scaled.param_groups[0]["reg"] == 1e-4
    train(start, scaled, 2)
    assert float(scaled.state[start.head.bias]["step"]) == 3


def test_torch_states_that_are_another_update_rule_or_order_are_refused():
    model = TwoLayers()
    amsgrad = torch.optim.AdamW(trainable(model), amsgrad=True)
    train(model, amsgrad, 1)
    with pytest.raises(ValueError, match=r"the saved torch AdamW state has amsgrad=True"):
        ScaledAdamW(trainable(model), precondition=False).load_state_dict(amsgrad.state_dict())
    adam = torch.optim.Adam(trainable(model), weight_decay=0.1)
    with pytest.raises(ValueError, match=r"torch\.optim\.Adam's with weight_decay=0\.1, which enters the gradient"):
        ScaledAdamW(trainable(model), precondition=False).load_state_dict(adam.state_dict())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = torch.optim.AdamW(named)  # in model order: l1.lora_down, l1.lora_up, ..., head.weight, head.bias
    head_first = ScaledAdamW([named[-2]] + named[:-2] + [named[-1]], precondition=False)
    with pytest.raises(ValueError, match=r"parameter 0 is 'l1\.lora_down\.weight' in the saved state but "
                       r"'head\.weight' here"):
        head_first.load_state_dict(saved.state_dict())


def test_float16_state_round_trips_in_float32_and_resumes_bit_identically(tmp_path):
    straight = TwoLayers().half()
    opt = build_optimizer(straight, "scaled_adamw", lr=1e-2)
    train(straight, opt, 6, torch.float16)
    resumed = TwoLayers().half()
    first = build_optimizer(resumed, "scaled_adamw", lr=1e-2)
    train(resumed, first, 3, torch.float16)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    second = build_optimizer(resumed, "scaled_adamw", lr=1e-2)
    second.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in second.state.values())
    train(resumed, second, 3, torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


# -- precision and non-finite factors ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, lr", [("scaled_adamw", 1e-2), ("adamw", 1e-2), ("scaled_gd", 0.3), ("sgd", 0.3)])
def test_float16_factors_train_like_float32_ones(name, lr):
    # float16 loses nothing that matters here: within 0.02 of the float32 loss at every one of 60 steps
    fp32, fp16 = TwoLayers(), TwoLayers().half()
    losses32 = train(fp32, build_optimizer(fp32, name, lr=lr), 60)
    losses16 = train(fp16, build_optimizer(fp16, name, lr=lr), 60, torch.float16)
    assert max(abs(a - b) for a, b in zip(losses32, losses16)) < 0.02
    assert losses16[-1] < 0.7 * losses16[0]
    assert all(p.dtype == torch.float16 and p.abs().max() < 5 for p in trainable(fp16))


@pytest.fixture(params=[0, 1 << 30], ids=["one-product-per-pair", "stacked"])
def bucket_strategy(request, monkeypatch):
    monkeypatch.setattr(core.preconditioner, "STACK_MAX_NUMEL", request.param)


@pytest.mark.parametrize("factor", ["l1.lora_down.weight", "l1.lora_up.weight"])
@pytest.mark.parametrize("name", ["scaled_adamw", "scaled_gd"])
def test_a_non_finite_factor_is_a_non_finite_error_naming_it(bucket_strategy, factor, name):
    model = TwoLayers()
    opt = build_optimizer(model, name, lr=1e-3)
    loss_of(model).backward()  # finite gradients; then the factor itself holds inf
    with torch.no_grad():
        model.get_parameter(factor)[0, 0] = float("inf")
    before = [p.detach().clone() for p in trainable(model)]
    with pytest.raises(NonFiniteGradientError, match=rf"non-finite value \(inf or nan\) inside 1 LoRA factor\(s\) "
                       rf"\(the parameter itself, not its gradient\): {factor}; no parameter was updated"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainable(model)))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("side", [0, 1])
def test_the_preconditioner_gives_nan_directions_for_a_non_finite_factor(bucket_strategy, batched, side):
    model = TwoLayers()
    loss_of(model).backward()
    pairs = [(p.A.detach().clone(), p.B.detach().clone(), 1) for p in find_lora_pairs(model)]
    grads = [(p.A.grad, p.B.grad) for p in find_lora_pairs(model)]
    pairs[0][side][1, 1] = float("nan") if side else float("inf")
    directions = preconditioned_directions(pairs, grads, reg=0.0, batched=batched)
    assert not torch.isfinite(directions[0][1 - side]).any()  # the partner's direction, through the Gram matrix
    assert all(torch.isfinite(d).all() for d in directions[1])
