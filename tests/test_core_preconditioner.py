"""The preconditioner's maths: closed forms, invariance, singular Grams, blocks, conv shapes, dtypes, both paths."""

import pytest
import torch

import core.preconditioner
from core import preconditioned_directions
from core.preconditioner import inverse_gram
from core.reference import reference_directions


def directions(A, B, grad_A, grad_B, reg, blocks=1, batched=False):
    """The directions of one pair through the public function."""
    [(d_A, d_B)] = preconditioned_directions([(A, B, blocks)], [(grad_A, grad_B)], reg, batched=batched)
    return d_A, d_B


@pytest.mark.parametrize("batched", [False, True])
def test_closed_form_on_tiny_matrices(batched):
    # B has orthogonal columns of norms 2 and 3: BᵀB = diag(4, 9); A's rows have norms 1 and 2: AAᵀ = diag(1, 4).
    B = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    A = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    gA = torch.arange(8.0).reshape(2, 4)
    gB = torch.arange(6.0).reshape(3, 2)
    G_A, G_B = directions(A, B, gA, gB, reg=1.0, batched=batched)
    torch.testing.assert_close(G_A, gA / torch.tensor([[5.0], [10.0]]))
    torch.testing.assert_close(G_B, gB / torch.tensor([[2.0, 5.0]]))


def test_non_diagonal_gram_matches_explicit_solve():
    torch.manual_seed(0)
    A, B = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    gA, gB = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    G_A, G_B = directions(A, B, gA, gB, reg=0.1)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(G_A, torch.linalg.inv(B.T @ B + 0.1 * eye) @ gA)
    torch.testing.assert_close(G_B, gB @ torch.linalg.inv(A @ A.T + 0.1 * eye))


def test_scaled_gd_first_order_change_is_invariant_to_factor_rescaling():
    # W = B A; under A -> S A, B -> B S⁻¹ the product is unchanged, and (reg = 0) so is -lr (G_B A + B G_A).
    torch.manual_seed(1)
    m, n, r = 6, 5, 2
    A, B = torch.randn(r, n, dtype=torch.float64), torch.randn(m, r, dtype=torch.float64)
    grad_W = torch.randn(m, n, dtype=torch.float64)  # dL/dW at W = BA
    S = torch.randn(r, r, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)

    def first_order_change(A, B):
        G_A, G_B = directions(A, B, B.T @ grad_W, grad_W @ A.T, reg=0.0)
        return G_B @ A + B @ G_A

    A2, B2 = S @ A, B @ torch.linalg.inv(S)
    torch.testing.assert_close(first_order_change(A2, B2), first_order_change(A, B))
    # plain gradients are not invariant: the check above can fail
    plain = lambda A, B: (grad_W @ A.T) @ A + B @ (B.T @ grad_W)  # noqa: E731
    assert not torch.allclose(plain(A2, B2), plain(A, B))


@pytest.mark.parametrize("batched", [False, True])
def test_reg_zero_with_zero_B_gives_zero_direction_for_A_without_crashing(batched):
    # PEFT initialises B = 0, so BᵀB = 0 at step 0. ∇A = Bᵀ(...) = 0 too: the minimum-norm solution is 0.
    A = torch.randn(4, 10)
    B = torch.zeros(8, 4)
    gA = torch.zeros(4, 10)
    gB = torch.randn(8, 4)
    G_A, G_B = directions(A, B, gA, gB, reg=0.0, batched=batched)
    assert torch.equal(G_A, torch.zeros_like(G_A))
    torch.testing.assert_close(G_B, gB @ torch.linalg.inv(A @ A.T), rtol=1e-4, atol=1e-5)


def test_singular_gram_uses_the_minimum_norm_solution_which_is_the_reg_to_zero_limit():
    torch.manual_seed(2)
    b = torch.randn(6, 1, dtype=torch.float64)
    B = torch.cat([b, 2 * b], dim=1)  # rank 1, so BᵀB (2x2) is singular
    grad_W = torch.randn(6, 5, dtype=torch.float64)
    gA = B.T @ grad_W  # lies in the row space of B, as every real ∇A does
    G_A = inverse_gram(B.T @ B, 0.0) @ gA
    limit, _ = directions(torch.randn(2, 5, dtype=torch.float64), B, gA, torch.zeros(6, 2, dtype=torch.float64), 1e-9)
    torch.testing.assert_close(G_A, limit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(G_A, torch.linalg.pinv(B.T @ B) @ gA)


def test_inverse_gram_handles_a_batch_mixing_definite_and_singular_matrices():
    torch.manual_seed(3)
    M = torch.randn(3, 3, dtype=torch.float64)
    definite = M @ M.T + torch.eye(3, dtype=torch.float64)
    v = torch.randn(3, 1, dtype=torch.float64)
    singular = v @ v.T  # rank 1
    inverse = inverse_gram(torch.stack([definite, singular, torch.zeros(3, 3, dtype=torch.float64)]), 0.0)
    torch.testing.assert_close(inverse[0], torch.linalg.inv(definite))
    torch.testing.assert_close(inverse[1], torch.linalg.pinv(singular))
    assert torch.equal(inverse[2], torch.zeros(3, 3, dtype=torch.float64))
    regularised = inverse_gram(singular.clone(), 0.5)
    torch.testing.assert_close(regularised, torch.linalg.inv(singular + 0.5 * torch.eye(3, dtype=torch.float64)))


@pytest.mark.parametrize("batched", [False, True])
def test_merged_blocks_are_preconditioned_separately(batched):
    torch.manual_seed(4)
    k, r, n, m = 2, 3, 8, 5
    A, B = torch.randn(k * r, n, dtype=torch.float64), torch.randn(k * m, r, dtype=torch.float64)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    G_A, G_B = directions(A, B, gA, gB, reg=0.01, blocks=k, batched=batched)
    for i in range(k):
        a, b = A[i * r : (i + 1) * r], B[i * m : (i + 1) * m]
        ga, gb = directions(a, b, gA[i * r : (i + 1) * r], gB[i * m : (i + 1) * m], reg=0.01)
        torch.testing.assert_close(G_A[i * r : (i + 1) * r], ga)
        torch.testing.assert_close(G_B[i * m : (i + 1) * m], gb)
    ref_A, ref_B = reference_directions(A, B, gA, gB, 0.01, blocks=k)
    torch.testing.assert_close(G_A, ref_A)
    torch.testing.assert_close(G_B, ref_B)


@pytest.mark.parametrize("batched", [False, True])
def test_conv_factors_are_flattened(batched):
    torch.manual_seed(5)
    A = torch.randn(4, 3, 3, 3, dtype=torch.float64)  # k x k conv, r = 4
    B = torch.randn(6, 4, 1, 1, dtype=torch.float64)  # 1 x 1 conv
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    G_A, G_B = directions(A, B, gA, gB, reg=0.1, batched=batched)
    assert G_A.shape == A.shape and G_B.shape == B.shape
    a, b = A.reshape(4, -1), B.reshape(6, 4)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(G_A.reshape(4, -1), torch.linalg.solve(b.T @ b + 0.1 * eye, gA.reshape(4, -1)))
    torch.testing.assert_close(G_B.reshape(6, 4), torch.linalg.solve(a @ a.T + 0.1 * eye, gB.reshape(6, 4).T).T)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factors_are_solved_in_float32(dtype, batched):
    # BᵀB has condition number 1e4: formed or solved in 16-bit precision, its relative error would be ~1e4 x 2^-8,
    # far beyond the one 16-bit rounding that a float32 solve leaves
    gen = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64, generator=gen))
    B = (U * torch.logspace(0, -2, 4, dtype=torch.float64)).to(dtype)
    A = torch.randn(4, 16, generator=gen).to(dtype)
    gA = (B.double().T @ torch.randn(12, 16, dtype=torch.float64, generator=gen)).to(dtype)
    gB = torch.randn(12, 4, generator=gen).to(dtype)
    G_A, G_B = directions(A, B, gA, gB, reg=0.0, batched=batched)
    assert G_A.dtype == G_B.dtype == dtype
    ref_A, ref_B = reference_directions(A, B, gA, gB, 0.0)
    rounding = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-3 * float(ref_A.abs().max()))
    torch.testing.assert_close(G_A.double(), ref_A.to(dtype).double(), **rounding)
    torch.testing.assert_close(G_B.double(), ref_B.to(dtype).double(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


@pytest.mark.parametrize("stack_max_numel", [0, 1 << 30], ids=["one-product-per-pair", "stacked"])
def test_batched_path_equals_the_per_pair_path_on_a_mix_of_pairs(monkeypatch, stack_max_numel):
    # several buckets (shapes, blocks, conv, dtypes), factors without a gradient, non-contiguous gradients
    monkeypatch.setattr(core.preconditioner, "STACK_MAX_NUMEL", stack_max_numel)
    gen = torch.Generator().manual_seed(7)
    shapes = [((3, 10), (8, 3), 1), ((3, 10), (8, 3), 1), ((6, 10), (8, 3), 2), ((4, 2, 3, 3), (5, 4, 1, 1), 1),
              ((3, 10), (8, 3), 1)]  # fmt: skip
    pairs = [(torch.randn(a, generator=gen), torch.randn(b, generator=gen), k) for a, b, k in shapes]
    pairs.append((torch.randn(2, 6, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64), 1))
    grads = [(torch.randn_like(A), torch.randn_like(B)) for A, B, _ in pairs]
    grads[1] = (None, grads[1][1])
    grads[4] = (grads[4][0], torch.randn(3, 8, generator=gen).T)  # a transposed (non-contiguous) gradient
    sums_per_pair, sums_batched = [], []
    expected = preconditioned_directions(pairs, grads, 1e-3, sums=sums_per_pair)
    for _ in range(2):  # the second call reuses the workspace's buffers and bucketing
        workspace = core.preconditioner.Workspace()
        got = preconditioned_directions(pairs, grads, 1e-3, batched=True, workspace=workspace, sums=sums_batched)
    assert got[1][0] is None and expected[1][0] is None
    for (e_A, e_B), (g_A, g_B) in zip(expected, got):
        for e, g in ((e_A, g_A), (e_B, g_B)):
            if e is not None:
                assert g.dtype == e.dtype and g.shape == e.shape
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    total = lambda sums: float(sum(s.double() for s in sums))  # noqa: E731
    assert total(sums_batched) / 2 == pytest.approx(total(sums_per_pair), rel=1e-4)


def test_directions_do_not_track_gradients_and_leave_inputs_alone():
    A, B = torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    gA, gB = torch.randn(2, 5), torch.randn(4, 2)
    before = [t.detach().clone() for t in (A, B, gA, gB)]
    for batched in (False, True):
        d_A, d_B = directions(A, B, gA, gB, 1e-3, batched=batched)
        assert not d_A.requires_grad and not d_B.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, (A, B, gA, gB)))


def test_bad_reg_and_mismatched_lengths_are_errors():
    pair, grad = (torch.ones(1, 2), torch.ones(2, 1), 1), (torch.ones(1, 2), torch.ones(2, 1))
    with pytest.raises(ValueError, match="reg must be a number >= 0, got -1.0"):
        preconditioned_directions([pair], [grad], reg=-1.0)
    with pytest.raises(ValueError, match="reg must be a number >= 0, got nan"):
        preconditioned_directions([pair], [grad], reg=float("nan"), batched=True)
    with pytest.raises(ValueError, match="got 2 gradient pairs for 1 LoRA pairs"):
        preconditioned_directions([pair], [grad, grad], reg=0.0)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_inverse_from_the_cholesky_factor_is_as_accurate_as_a_cholesky_solve(cond):
    # the r x r inverse is formed from the Cholesky factor and applied by one product; in float32 its error is that
    # of a solve against the wide right-hand side: both are dominated by forming BᵀB itself, of condition `cond`
    gen = torch.Generator().manual_seed(int(cond))
    m, n, r = 256, 128, 16
    ours_err, solve_err = [], []
    for _ in range(10):
        U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=gen))
        B = (U * torch.logspace(0, -0.5 * float(torch.tensor(cond).log10()), r, dtype=torch.float64)) @ V.T
        A = torch.randn(r, n, dtype=torch.float64, generator=gen)
        gA = B.T @ torch.randn(m, n, dtype=torch.float64, generator=gen)
        exact = torch.linalg.solve(B.T @ B, gA)
        ours, _ = directions(A.float(), B.float(), gA.float(), torch.zeros(m, r), reg=0.0, batched=True)
        solve = torch.cholesky_solve(gA.float(), torch.linalg.cholesky(B.float().T @ B.float()))
        ours_err.append(float((ours.double() - exact).norm() / exact.norm()))
        solve_err.append(float((solve.double() - exact).norm() / exact.norm()))
    assert max(ours_err) <= 1.5 * max(solve_err) + 1e-6
    assert sorted(ours_err)[5] <= 1.5 * sorted(solve_err)[5] + 1e-6
