"""The theory experiment's problem: convex ReLU operator, conditioning, spectral initialization, LoRA pairing."""

import math

import pytest
import torch

from core import build_optimizer, find_lora_pairs
from main_figures.theory import (
    ConvexReLULoRA, convex_relu, convex_relu_adjoint, geometric_spectrum, load_optim, make_problem, run_one,
    spectral_init,
)  # fmt: skip

SMALL = dict(n=64, d=6, neurons=4, rank=2, seed=3)


def test_convex_relu_is_the_sum_of_masked_linear_maps():
    problem = make_problem(10, **SMALL)
    W = torch.randn(4, 6, dtype=torch.float64)
    expected = sum(torch.diag(problem.patterns[:, i]) @ problem.X @ W[i] for i in range(4))
    torch.testing.assert_close(convex_relu(problem.X, problem.patterns, W), expected)
    # the patterns are ReLU arrangement patterns: 0/1 and both values occur
    assert set(problem.patterns.unique().tolist()) == {0.0, 1.0}


def test_adjoint_matches_the_operator():
    problem = make_problem(10, **SMALL)
    W, e = torch.randn(4, 6, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    lhs = convex_relu(problem.X, problem.patterns, W) @ e
    rhs = (W * convex_relu_adjoint(problem.X, problem.patterns, e)).sum()
    assert math.isclose(lhs.item(), rhs.item(), rel_tol=1e-10)


@pytest.mark.parametrize("kappa", [1, 100, 1e4])
def test_condition_number_is_placed_where_asked(kappa):
    target = make_problem(kappa, conditioning="target", **SMALL)
    s = torch.linalg.svdvals(target.delta_star)[: SMALL["rank"]]
    assert math.isclose((s[0] / s[-1]).item(), kappa, rel_tol=1e-8)
    sx = torch.linalg.svdvals(target.X)
    assert math.isclose((sx[0] / sx[-1]).item(), 1.0, rel_tol=1e-8)

    data = make_problem(kappa, conditioning="data", **SMALL)
    sx = torch.linalg.svdvals(data.X)
    assert math.isclose((sx[0] / sx[-1]).item(), kappa, rel_tol=1e-6)
    s = torch.linalg.svdvals(data.delta_star)[: SMALL["rank"]]
    assert math.isclose((s[0] / s[-1]).item(), 1.0, rel_tol=1e-8)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="kappa"):
        geometric_spectrum(0.5, 3)
    with pytest.raises(ValueError, match="conditioning"):
        make_problem(10, conditioning="labels", **SMALL)
    with pytest.raises(ValueError, match="rank"):
        make_problem(10, **{**SMALL, "rank": 7})
    with pytest.raises(ValueError, match="no optimizer config 'adam'"):
        load_optim("adam")


def test_targets_come_from_the_pretrained_weight_plus_the_update():
    problem = make_problem(100, **SMALL)
    assert problem.loss(problem.W0 + problem.delta_star).item() < 1e-25
    assert problem.loss(problem.W0).item() > 0


def test_model_exposes_one_peft_style_lora_pair_with_spectral_init():
    problem = make_problem(100, **SMALL)
    model = ConvexReLULoRA(problem)
    pairs = find_lora_pairs(model)
    assert [(p.a_name, p.b_name) for p in pairs] == [("layer.lora_A.default.weight", "layer.lora_B.default.weight")]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "layer.lora_A.default.weight", "layer.lora_B.default.weight"]  # fmt: skip
    A0, B0 = spectral_init(problem)
    assert A0.shape == (2, 6) and B0.shape == (4, 2)
    assert torch.linalg.matrix_rank(B0 @ A0).item() == 2  # B is not zero: the theory's initialization
    torch.testing.assert_close(A0 @ A0.T, B0.T @ B0)  # balanced factors
    # the initialization already explains part of the targets
    assert problem.loss(problem.W0 + B0 @ A0) < problem.loss(problem.W0)
    # core's scaled optimizer accepts the model
    build_optimizer(model, "scaled_gd", lr=0.1, reg=0.0)


def test_run_one_reaches_the_tolerance_and_reports_divergence():
    problem = make_problem(10, **SMALL)
    ok = run_one(problem, {**load_optim("scaled_gd"), "lr": 0.25}, max_iters=3000, tol=1e-10)
    assert ok.reached_tol and not ok.diverged and ok.relative_loss <= 1e-10 and ok.iterations < 3000
    bad = run_one(problem, {**load_optim("sgd"), "lr": 50.0}, max_iters=3000, tol=1e-10)
    assert bad.diverged and not bad.reached_tol and bad.iterations < 100
    capped = run_one(problem, {**load_optim("sgd"), "lr": 1e-3}, max_iters=5, tol=1e-10)
    assert capped.iterations == 5 and not capped.reached_tol and not capped.diverged
