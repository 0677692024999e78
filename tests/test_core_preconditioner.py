"""The preconditioner's maths: closed forms, invariance, singular Grams, blocks, conv shapes, dtypes."""

import pytest
import torch

from core.preconditioner import gram_inverse, precondition_pair
from core.reference import reference_directions


def test_closed_form_on_tiny_matrices():
    # B has orthogonal columns of norms 2 and 3: BᵀB = diag(4, 9); A's rows have norms 1 and 2: AAᵀ = diag(1, 4).
    B = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    A = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    gA = torch.arange(8.0).reshape(2, 4)
    gB = torch.arange(6.0).reshape(3, 2)
    G_A, G_B = precondition_pair(A, B, gA, gB, reg=1.0)
    torch.testing.assert_close(G_A, gA / torch.tensor([[5.0], [10.0]]))
    torch.testing.assert_close(G_B, gB / torch.tensor([[2.0, 5.0]]))


def test_non_diagonal_gram_matches_explicit_solve():
    torch.manual_seed(0)
    A, B = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    gA, gB = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    G_A, G_B = precondition_pair(A, B, gA, gB, reg=0.1)
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
        G_A, G_B = precondition_pair(A, B, B.T @ grad_W, grad_W @ A.T, reg=0.0)
        return G_B @ A + B @ G_A

    A2, B2 = S @ A, B @ torch.linalg.inv(S)
    torch.testing.assert_close(first_order_change(A2, B2), first_order_change(A, B))
    # plain gradients are not invariant: the check above can fail
    plain = lambda A, B: (grad_W @ A.T) @ A + B @ (B.T @ grad_W)  # noqa: E731
    assert not torch.allclose(plain(A2, B2), plain(A, B))


def test_reg_zero_with_zero_B_gives_zero_direction_for_A_without_crashing():
    # PEFT initialises B = 0, so BᵀB = 0 at step 0. ∇A = Bᵀ(...) = 0 too: the minimum-norm solution is 0.
    A = torch.randn(4, 10)
    B = torch.zeros(8, 4)
    gA = torch.zeros(4, 10)
    gB = torch.randn(8, 4)
    G_A, G_B = precondition_pair(A, B, gA, gB, reg=0.0)
    assert torch.equal(G_A, torch.zeros_like(G_A))
    torch.testing.assert_close(G_B, gB @ torch.linalg.inv(A @ A.T), rtol=1e-4, atol=1e-5)


def test_singular_gram_uses_the_minimum_norm_solution_which_is_the_reg_to_zero_limit():
    torch.manual_seed(2)
    b = torch.randn(6, 1, dtype=torch.float64)
    B = torch.cat([b, 2 * b], dim=1)  # rank 1, so BᵀB (2x2) is singular
    grad_W = torch.randn(6, 5, dtype=torch.float64)
    gA = B.T @ grad_W  # lies in the row space of B, as every real ∇A does
    G_A = gram_inverse(B.T @ B) @ gA
    limit, _ = precondition_pair(torch.randn(2, 5, dtype=torch.float64), B, gA, torch.zeros(6, 2, dtype=torch.float64), reg=1e-9)
    torch.testing.assert_close(G_A, limit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(G_A, torch.linalg.pinv(B.T @ B) @ gA)


def test_gram_inverse_handles_a_batch_mixing_definite_and_singular_matrices():
    torch.manual_seed(3)
    M = torch.randn(3, 3, dtype=torch.float64)
    definite = M @ M.T + torch.eye(3, dtype=torch.float64)
    v = torch.randn(3, 1, dtype=torch.float64)
    singular = v @ v.T  # rank 1
    inverse = gram_inverse(torch.stack([definite, singular, torch.zeros(3, 3, dtype=torch.float64)]))
    torch.testing.assert_close(inverse[0], torch.linalg.inv(definite))
    torch.testing.assert_close(inverse[1], torch.linalg.pinv(singular))
    assert torch.equal(inverse[2], torch.zeros(3, 3, dtype=torch.float64))


def test_merged_blocks_are_preconditioned_separately():
    torch.manual_seed(4)
    k, r, n, m = 2, 3, 8, 5
    A, B = torch.randn(k * r, n, dtype=torch.float64), torch.randn(k * m, r, dtype=torch.float64)
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    G_A, G_B = precondition_pair(A, B, gA, gB, reg=0.01, blocks=k)
    for i in range(k):
        a, b = A[i * r : (i + 1) * r], B[i * m : (i + 1) * m]
        ga, gb = precondition_pair(a, b, gA[i * r : (i + 1) * r], gB[i * m : (i + 1) * m], reg=0.01)
        torch.testing.assert_close(G_A[i * r : (i + 1) * r], ga)
        torch.testing.assert_close(G_B[i * m : (i + 1) * m], gb)
    ref_A, ref_B = reference_directions(A, B, gA, gB, 0.01, blocks=k)
    torch.testing.assert_close(G_A, ref_A)
    torch.testing.assert_close(G_B, ref_B)


def test_conv_factors_are_flattened():
    torch.manual_seed(5)
    A = torch.randn(4, 3, 3, 3, dtype=torch.float64)  # k x k conv, r = 4
    B = torch.randn(6, 4, 1, 1, dtype=torch.float64)  # 1 x 1 conv
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    G_A, G_B = precondition_pair(A, B, gA, gB, reg=0.1)
    assert G_A.shape == A.shape and G_B.shape == B.shape
    a, b = A.reshape(4, -1), B.reshape(6, 4)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(G_A.reshape(4, -1), torch.linalg.solve(b.T @ b + 0.1 * eye, gA.reshape(4, -1)))
    torch.testing.assert_close(G_B.reshape(6, 4), torch.linalg.solve(a @ a.T + 0.1 * eye, gB.reshape(6, 4).T).T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factors_are_solved_in_float32(dtype):
    torch.manual_seed(6)
    A, B = torch.randn(4, 16).to(dtype), torch.randn(12, 4).to(dtype)
    gA, gB = torch.randn(4, 16).to(dtype), torch.randn(12, 4).to(dtype)
    G_A, G_B = precondition_pair(A, B, gA, gB, reg=1e-3)
    assert G_A.dtype == torch.float32
    ref_A, ref_B = reference_directions(A, B, gA, gB, 1e-3)
    torch.testing.assert_close(G_A.double(), ref_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(G_B.double(), ref_B, rtol=1e-4, atol=1e-5)


def test_negative_reg_is_an_error():
    with pytest.raises(ValueError, match="reg must be >= 0, got -1"):
        precondition_pair(torch.ones(1, 2), torch.ones(2, 1), torch.ones(1, 2), torch.ones(2, 1), reg=-1.0)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_inverse_from_the_cholesky_factor_is_as_accurate_as_a_cholesky_solve(cond):
    # the r x r inverse is formed from the Cholesky factor and applied by one product (faster than two triangular
    # solves against the wide right-hand side); in float32 its error is that of a solve: both are dominated by
    # forming BᵀB itself, whose condition number is `cond`
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
        ours, _ = precondition_pair(A.float(), B.float(), gA.float(), torch.zeros(m, r), reg=0.0)
        solve = torch.cholesky_solve(gA.float(), torch.linalg.cholesky(B.float().T @ B.float()))
        ours_err.append(float((ours.double() - exact).norm() / exact.norm()))
        solve_err.append(float((solve.double() - exact).norm() / exact.norm()))
    assert max(ours_err) <= 1.5 * max(solve_err) + 1e-6
    assert sorted(ours_err)[5] <= 1.5 * sorted(solve_err)[5] + 1e-6
