"""Orthonormalisers: where each is accurate and how the fragile ones fail (κ sweep)."""

import pytest
import torch

from kvsvd.orth import ORTH_METHODS, CholeskyBreakdown, default_orth, orthonormalise
from conftest import conditioned, orth_error

STABLE = ["householder", "shifted_cholqr3", "adaptive_cholqr"]


def _block(kappa: float, r: int = 400, c: int = 24) -> torch.Tensor:
    return conditioned(r, c, kappa)[None]


@pytest.mark.parametrize("method", sorted(ORTH_METHODS))
def test_every_method_factorises_a_well_conditioned_block(method):
    X = _block(10.0)
    Q, R = orthonormalise(X, method)
    assert Q.shape == X.shape and R.shape == (1, 24, 24)
    bf16 = method in ("cholqr_v1", "cholqr_v4")  # BF16 Gram (and, in v4, Q rounded to BF16)
    assert torch.allclose(Q @ R, X, atol=(2e-2 if bf16 else 1e-4) * float(X.abs().max()))
    tol = 1e-1 if bf16 else 1e-4
    assert orth_error(Q) < tol
    assert torch.allclose(torch.triu(R), R)


@pytest.mark.parametrize("method", STABLE)
@pytest.mark.parametrize("kappa", [1e2, 1e5, 1e7])
def test_stable_methods_stay_orthonormal_as_kappa_grows(method, kappa):
    Q, R = orthonormalise(_block(kappa), method)
    assert torch.isfinite(Q).all() and orth_error(Q) < 1e-5


def test_cholqr2_is_accurate_below_its_limit_and_not_above():
    assert orth_error(orthonormalise(_block(1e2), "cholqr2")[0]) < 1e-5
    with pytest.raises(CholeskyBreakdown, match="cholqr"):
        # κ = 1e7 squares to 1e14 in the Gram matrix: beyond FP32, Cholesky breaks down
        orthonormalise(_block(1e7), "cholqr2")


def test_plain_cholqr_loses_orthogonality_with_kappa():
    errs = [orth_error(orthonormalise(_block(k), "cholqr")[0]) for k in (1e1, 1e3)]
    assert errs[0] < 1e-5 < errs[1]  # O(κ² u): 1e6 · 6e-8 is already visible


def test_legacy_v1_loses_orthogonality_even_when_well_conditioned():
    # v1's BF16 Gram matrix leaves ~3e-2 orthogonality error at κ=10 ...
    assert orth_error(orthonormalise(_block(10.0), "cholqr_v1")[0]) > 1e-2
    # ... while at κ=1e3 its Cholesky throws and the Householder fallback takes over
    assert orth_error(orthonormalise(_block(1e3), "cholqr_v1")[0]) < 1e-5


def test_legacy_v4_rounds_q_to_bf16():
    Q, _ = orthonormalise(_block(10.0), "cholqr_v4")
    assert torch.equal(Q, Q.bfloat16().float())
    assert orth_error(Q) > 1e-4


@pytest.mark.parametrize("method", STABLE + ["cholqr_v2"])
def test_rank_deficient_and_zero_blocks_give_finite_orthonormal_q(method):
    X = torch.zeros(3, 200, 12)
    X[1, :, :6] = torch.randn(200, 6)
    X[1, :, 6:] = X[1, :, :6] @ torch.randn(6, 6)      # rank 6 of 12
    X[2] = torch.randn(200, 12)
    Q, R = orthonormalise(X, method)
    assert torch.isfinite(Q).all() and torch.isfinite(R).all()
    if method in STABLE:
        assert orth_error(Q) < 1e-5
    assert torch.allclose(Q @ R, X, atol=1e-3 * (1 + float(X.abs().max())))


def test_plain_cholqr_and_legacy_v3_raise_on_a_zero_block():
    with pytest.raises(CholeskyBreakdown):
        orthonormalise(torch.zeros(1, 50, 4), "cholqr")
    # v3's shift is -λ_min + ε·mean(diag G) = 0 for G = 0: its Cholesky cannot succeed
    with pytest.raises(torch.linalg.LinAlgError):
        orthonormalise(torch.zeros(1, 50, 4), "cholqr_v3")


def test_unknown_method_names_the_parameter():
    with pytest.raises(ValueError, match="qr='nope'.*householder"):
        orthonormalise(torch.randn(1, 10, 3), "nope")


def test_default_orth_is_device_dependent():
    assert default_orth(torch.device("cpu")) == "householder"
    assert default_orth(torch.device("cuda", 0)) == "adaptive_cholqr"
