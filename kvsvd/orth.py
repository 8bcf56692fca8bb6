"""Orthonormalisation of tall-skinny blocks: Householder, the Cholesky-QR family, the legacy v1-v4.

Every method maps ``X`` of shape ``(b, r, c)`` with ``r >= c`` (float32) to ``(Q, R)`` with
``Q`` ``(b, r, c)`` float32 and ``R`` ``(b, c, c)`` float32 upper triangular, ``X ≈ Q @ R``.
A Cholesky-QR step computes ``Q = X R⁻¹``, so ``X = Q R`` holds by construction even where a
jitter or shift makes ``Q`` less orthonormal: the methods differ only in how orthonormal
``Q`` is, which is exactly what the stability notebook plots.

Stable methods (``householder``, ``shifted_cholqr3``, ``adaptive_cholqr``)
fall back to Householder for the batch entries whose Cholesky factorisation breaks down
(rank deficiency, an all-zero block); ``cholqr`` and ``cholqr2`` raise instead, so that
their failure is visible. The legacy variants are re-implemented as the kv-svd kernels did
them (see shared/REFERENCES.md) so their failure modes can be shown side by side.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
OrthFn = Callable[[Tensor], tuple[Tensor, Tensor]]

_U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32
# CholQR2 is accurate while κ(X) ≲ u^{-1/2} (≈ 4e3 in fp32); the estimate is a lower bound, so stay
# an order of magnitude below it.
_CHOLQR2_KAPPA_LIMIT = 2e2


class CholeskyBreakdown(torch.linalg.LinAlgError):
    """A Cholesky-QR method met a Gram matrix that is not numerically positive definite."""


def _gram(X: Tensor) -> Tensor:
    """``Xᵀ X`` in float32, symmetrised. X (b, r, c) -> (b, c, c)."""
    G = X.mT @ X
    return 0.5 * (G + G.mT)


def _right_solve(X: Tensor, R: Tensor) -> Tensor:
    """``X R⁻¹`` for upper-triangular R: a small triangular inverse, then one GEMM (faster than TRSM)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return X @ torch.linalg.solve_triangular(R, eye, upper=True)


def _chol_step(X: Tensor, G: Tensor | None = None, shift: Tensor | float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Cholesky-QR step on the column-scaled Gram matrix (CholQR is scaling invariant).

    Returns ``(Q, R, ok, kappa)``: ``ok`` (b,) marks entries that factorised, ``kappa`` (b,) is
    1 / min diag of the scaled factor, a cheap estimate of κ of the column-normalised X.
    """
    G = _gram(X) if G is None else G
    c = G.shape[-1]
    eye = torch.eye(c, dtype=G.dtype, device=G.device)
    if not isinstance(shift, float) or shift != 0.0:
        G = G + torch.as_tensor(shift, dtype=G.dtype, device=G.device).reshape(-1, 1, 1) * eye
    d = G.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(torch.finfo(G.dtype).tiny)
    L, info = torch.linalg.cholesky_ex(G / d.unsqueeze(-1) / d.unsqueeze(-2))
    ok = (info == 0) & torch.isfinite(L).flatten(1).all(-1)
    Rs = torch.where(ok.reshape(-1, 1, 1), L.mT, eye)  # failed entries stay finite; callers decide
    kappa = 1.0 / Rs.diagonal(dim1=-2, dim2=-1).amin(-1).clamp_min(torch.finfo(G.dtype).tiny)
    R = Rs * d.unsqueeze(-2)
    return _right_solve(X, R), R, ok, kappa


def _householder_where(X: Tensor, Q: Tensor, R: Tensor, bad: Tensor) -> tuple[Tensor, Tensor]:
    """Replace the entries flagged in ``bad`` (b,) by their Householder QR."""
    if bool(bad.any()):
        Qh, Rh = torch.linalg.qr(X[bad])
        Q, R = Q.clone(), R.clone()
        Q[bad], R[bad] = Qh, Rh
    return Q, R


def householder(X: Tensor) -> tuple[Tensor, Tensor]:
    """LAPACK/cuSOLVER Householder QR (geqrf + orgqr): orthonormal to O(u) for any X."""
    return torch.linalg.qr(X)


def cholqr(X: Tensor) -> tuple[Tensor, Tensor]:
    """Plain Cholesky QR: orthogonality error O(κ²u); raises CholeskyBreakdown when XᵀX is not PD."""
    Q, R, ok, _ = _chol_step(X)
    if not bool(ok.all()):
        raise CholeskyBreakdown(f"cholqr: Cholesky of XᵀX failed for {int((~ok).sum())} batch entries "
                                "(ill-conditioned or rank-deficient block); use qr='shifted_cholqr3' or 'auto'")
    return Q, R


def cholqr2(X: Tensor) -> tuple[Tensor, Tensor]:
    """CholQR applied twice: O(u) orthogonality while κ(X) ≲ u^{-1/2}; raises on breakdown."""
    Q1, R1 = cholqr(X)
    Q, R2 = cholqr(Q1)
    return Q, R2 @ R1


def _fukaya_shift(X: Tensor, G: Tensor) -> Tensor:
    """Shift s = 11 (r c + c (c+1)) u ‖X‖₂² with ‖X‖₂² bounded by ‖X‖_F² = tr(G). Returns (b,)."""
    r, c = X.shape[-2:]
    return 11.0 * (r * c + c * (c + 1)) * _U32 * G.diagonal(dim1=-2, dim2=-1).sum(-1)


def _shifted_then_cholqr2(X: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted CholQR step followed by CholQR2; returns (Q, R, ok)."""
    Q1, R1, ok1, _ = _chol_step(X, G, shift=_fukaya_shift(X, G))
    Q2, R2, ok2, _ = _chol_step(Q1)
    Q, R3, ok3, _ = _chol_step(Q2)
    return Q, R3 @ R2 @ R1, ok1 & ok2 & ok3


def shifted_cholqr3(X: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted CholQR3 (Fukaya et al. 2020): O(u) orthogonality up to κ(X) = O(u^{-1}).

    Entries that are numerically rank-deficient beyond that fall back to Householder.
    """
    Q, R, ok = _shifted_then_cholqr2(X, _gram(X))
    return _householder_where(X, Q, R, ~ok)


def adaptive_cholqr(X: Tensor) -> tuple[Tensor, Tensor]:
    """CholQR2 where κ(X) is small, shifted CholQR3 otherwise.

    The first Cholesky factor of the column-scaled Gram matrix estimates κ of the normalised
    columns; entries above the CholQR2 limit are redone with the Fukaya shift (reusing the
    Gram matrix), and entries that still break down get Householder. Never returns NaN for
    finite X.
    """
    G = _gram(X)
    Q1, R1, ok1, kappa = _chol_step(X, G)
    Q, R2, ok2, _ = _chol_step(Q1)
    R = R2 @ R1
    hard = ~(ok1 & ok2 & (kappa < _CHOLQR2_KAPPA_LIMIT))
    if bool(hard.any()):
        Qs, Rs, oks = _shifted_then_cholqr2(X[hard], G[hard])
        Qs, Rs = _householder_where(X[hard], Qs, Rs, ~oks)
        Q, R = Q.clone(), R.clone()
        Q[hard], R[hard] = Qs, Rs
    return Q, R


def certified_cholqr(X: Tensor, max_kappa: float = 16.0) -> tuple[Tensor, Tensor]:
    """One Cholesky-QR step where it is provably enough. Returns ``(R (b, c, c), ok (b,))``.

    CholQR's orthogonality error grows like κ(C)·u with C the column-scaled Gram matrix
    (κ(C) = κ(X_scaled)²). The certificate is κ(C) from ``eigvalsh`` of the small c × c
    matrix in FP64; entries with κ(C) ≤ ``max_kappa`` (16: ≈ 4e-7 orthogonality measured on
    KV-like blocks) are done in one step. The caller forms Q = X R⁻¹ (or folds R⁻¹ into its
    next GEMM) for them and orthonormalises the others another way.
    """
    G = _gram(X)
    c = G.shape[-1]
    eye = torch.eye(c, dtype=G.dtype, device=G.device)
    d = G.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(torch.finfo(G.dtype).tiny)
    C = G / d.unsqueeze(-1) / d.unsqueeze(-2)
    lam = torch.linalg.eigvalsh(C.double())
    L, info = torch.linalg.cholesky_ex(C)
    ok = (info == 0) & (lam[..., 0] * max_kappa >= lam[..., -1]) & torch.isfinite(L).flatten(1).all(-1)
    Rs = torch.where(ok.reshape(-1, 1, 1), L.mT, eye)
    return Rs * d.unsqueeze(-2), ok


# --- Legacy kv-svd variants (faithful re-implementations, for comparison only) -------------

def _normalise_columns(X: Tensor) -> tuple[Tensor, Tensor]:
    """FP32 column-norm normalisation used by v2-v4. Returns (X / norms, norms (b, c))."""
    norms = X.float().norm(dim=-2).clamp_min(torch.finfo(torch.float32).tiny)
    return X / norms.unsqueeze(-2), norms


def _jittered_cholesky(G: Tensor, eps0: float, tries: int) -> tuple[Tensor, Tensor, float]:
    """Cholesky of G + ε·mean(diag G)·I with ε = eps0·10^i, i < tries. Returns (L, ok, last ε)."""
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).reshape(-1, 1, 1)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    eps = eps0
    for i in range(tries):
        eps = eps0 * 10.0 ** i
        L, info = torch.linalg.cholesky_ex(G + eps * scale * eye)
        if bool((info == 0).all()):
            return L, info == 0, eps
    return L, info == 0, eps


def _eigen_clamped(G: Tensor, floor: float) -> Tensor:
    """Rebuild G from its eigendecomposition with eigenvalues clamped below at ``floor``."""
    lam, V = torch.linalg.eigh(G)
    return (V * lam.clamp_min(floor).unsqueeze(-2)) @ V.mT


def cholqr_v1(X: Tensor) -> tuple[Tensor, Tensor]:
    """v1: Gram of the BF16 block, fixed absolute jitter 1e-4, Householder if Cholesky throws."""
    Xb = X.bfloat16()
    G = (Xb.mT @ Xb).float() + 1e-4 * torch.eye(X.shape[-1], device=X.device)
    L, info = torch.linalg.cholesky_ex(G)
    if not bool((info == 0).all()):
        return torch.linalg.qr(X)
    R = L.mT
    return _right_solve(X, R), R


def cholqr_v2(X: Tensor) -> tuple[Tensor, Tensor]:
    """v2: FP32 column normalisation, trace-scaled jitter 1e-6..1e-3 (4 tries), eigh clamp+rebuild."""
    Xn, norms = _normalise_columns(X)
    G = _gram(Xn)
    L, ok, eps = _jittered_cholesky(G, 1e-6, 4)
    if not bool(ok.all()):
        L = torch.linalg.cholesky(_eigen_clamped(G, max(1e-4, 1.5 * eps)))
    R = L.mT
    return _right_solve(Xn, R), R * norms.unsqueeze(-2)


def cholqr_v3(X: Tensor) -> tuple[Tensor, Tensor]:
    """v3: as v2, but the fallback shifts G by -λ_min (eigvalsh) plus the last jitter."""
    Xn, norms = _normalise_columns(X)
    G = _gram(Xn)
    L, ok, eps = _jittered_cholesky(G, 1e-6, 4)
    if not bool(ok.all()):
        lam_min = torch.linalg.eigvalsh(G)[..., 0]
        scale = G.diagonal(dim1=-2, dim2=-1).mean(-1)
        shift = (-lam_min).clamp_min(0) + eps * scale
        L = torch.linalg.cholesky(G + shift.reshape(-1, 1, 1) * torch.eye(G.shape[-1], device=G.device))
    R = L.mT
    return _right_solve(Xn, R), R * norms.unsqueeze(-2)


def cholqr_v4(X: Tensor) -> tuple[Tensor, Tensor]:
    """v4: BF16 block and Gram, FP32 normalisation cast back to BF16, jitter 1e-6..1e-1 (6 tries),
    eigh clamp+rebuild, then Householder; Q is returned rounded to BF16."""
    Xn, norms = _normalise_columns(X)
    Xb = Xn.bfloat16()
    G = (Xb.mT @ Xb).float()
    L, ok, eps = _jittered_cholesky(G, 1e-6, 6)
    if not bool(ok.all()):
        L, info = torch.linalg.cholesky_ex(_eigen_clamped(G, max(1e-4, 1.5 * eps)))
        if not bool((info == 0).all()):
            return torch.linalg.qr(X)
    R = L.mT
    Q = _right_solve(Xb.float(), R).bfloat16().float()
    return Q, R * norms.unsqueeze(-2)


ORTH_METHODS: dict[str, OrthFn] = {
    "householder": householder,
    "cholqr": cholqr,
    "cholqr2": cholqr2,
    "shifted_cholqr3": shifted_cholqr3,
    "adaptive_cholqr": adaptive_cholqr,
    "cholqr_v1": cholqr_v1,
    "cholqr_v2": cholqr_v2,
    "cholqr_v3": cholqr_v3,
    "cholqr_v4": cholqr_v4,
}


def default_orth(device: torch.device) -> str:
    """The orthonormaliser ``qr="auto"`` uses: measured, not assumed.

    On CUDA, Householder QR is panel-bound and the Cholesky-QR family (GEMM-rich) wins. On a
    CPU, MKL's blocked Householder QR ran as fast as CholQR2 and 2-4× faster than shifted
    CholQR3 for the shapes rsvd meets (8192×136: 6.3 vs 6.8 vs 10.2 ms on 2 EPYC cores).
    """
    return "adaptive_cholqr" if device.type == "cuda" else "householder"


def orthonormalise(X: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Orthonormalise the columns of X (b, r, c), r >= c, float32, by the named method."""
    try:
        fn = ORTH_METHODS[method]
    except KeyError:
        raise ValueError(f"qr={method!r} is not an orthonormalisation method; "
                         f"accepted: {sorted(ORTH_METHODS)}") from None
    return fn(X)
