"""Batched truncated SVD: randomized (Halko–Martinsson–Tropp) with Cholesky-QR, an exact Gram
path, and the two PyTorch baselines behind one signature.

Every method here is called as ``fn(A, rank, *, n_iter, oversample, qr, compute_dtype,
generator, timer) -> (U, S, Vh)`` with ``A`` of shape ``(..., m, n)``, ``U`` ``(..., m, rank)``
and ``Vh`` ``(..., rank, n)`` in A's dtype, ``S`` ``(..., rank)`` float32 (float64 for a float64
A), singular values descending. ``SVD_METHODS`` maps the names used by benchmarks,
notebooks and caches to the functions.

The randomized path works on the tall orientation (m ≥ n; a wide A is transposed, a view)
and keeps its basis on the short side, n × ℓ with ℓ = rank + oversample, so every
power-iteration orthonormalisation is small (n × ℓ) instead of an m × ℓ QR per product:

    Z = Aᵀ Ω,  Q = orth(Z)            Ω ~ N(0, 1) of shape m × ℓ           (projection)
    repeat n_iter: Z = Aᵀ (A Q)       the last one rotated onto its Ritz
                   Q = orth(Z)        vectors (eigh of Qᵀ Z, ℓ × ℓ)         (power_iteration)
    B = A Q                           at A's own dtype                      (final_qr)
    B = Q_B R                         one certified CholQR step: B's columns are nearly
                                      orthogonal after the rotation; else orth(B)
    R = U_R Σ Wᵀ                      ℓ × ℓ SVD in FP32/FP64                (small_svd_fp32)
    U = B (R⁻¹ U_R),  Vᵀ = Wᵀ Qᵀ      lift fused into one GEMM; truncated   (lift)

That is 2·n_iter + 2 passes over A, the same as ``torch.svd_lowrank(niter=n_iter)``, with the
same spectral exponent σ^(2·n_iter+1); svd_lowrank also does n_iter Householder QRs and one
SVD of m × ℓ blocks, which this path replaces by one Gram matrix and small factorisations.
Orthonormalising once per Aᵀ A product rather than after every product loses modes below
√u·σ₁ (≈ 2.4e-4·σ₁ in FP32), which never matter for a rank-k truncation error.

The exact Gram path forms G = Aᵀ A (n × n), takes its top-``rank`` eigenvectors V, then U
from the certified factorisation of A V (whose columns are orthogonal by construction). It
costs one Gram GEMM, an n × n ``eigh`` and one thin pass, independent of ``n_iter``, and is
exact up to the squared condition number (modes below √u·σ₁ are not resolved, irrelevant
to the truncation error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .orth import ORTH_METHODS, certified_cholqr, default_orth, orthonormalise
from .timing import StageTimer, maybe_stage

Tensor = torch.Tensor
SVDResult = tuple[Tensor, Tensor, Tensor]

QR_METHODS = ("auto", "gram", *ORTH_METHODS)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# eigh of an n × n matrix costs about this many GEMM-flop equivalents per n³ (measured on
# a 2-core EPYC: n=768 took 22 ms at 220 GFLOP/s GEMM speed; GPUs are no kinder to eigh).
_EIGH_FLOPS_PER_N3 = 12.0


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value} is out of range; accepted: {rng}")
    return value


def validate_svd_args(A: Tensor, rank: int, n_iter: int, oversample: int, qr: str,
                      compute_dtype: torch.dtype | None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending parameter and its accepted range."""
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.is_complex() or A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"A has dtype {A.dtype}; accepted: {', '.join(map(str, _FLOAT_DTYPES))}")
    if A.ndim < 2 or A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"A must have shape (..., m, n) with m, n >= 1, got {tuple(A.shape)}")
    _check_int("rank", rank, 1, min(A.shape[-2:]))
    _check_int("n_iter", n_iter, 0)
    _check_int("oversample", oversample, 0)
    if qr not in QR_METHODS:
        raise ValueError(f"qr={qr!r} is unknown; accepted: {', '.join(QR_METHODS)}")
    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"compute_dtype={compute_dtype}; accepted: {', '.join(map(str, _FLOAT_DTYPES))} or None")
    # One reduction propagates any NaN/Inf (28× cheaper than isfinite(A).all() on 8192×1536);
    # the exact check runs only when the sum is not finite (NaN/Inf, or a sum that overflowed).
    if not bool(torch.isfinite(A.sum())) and not bool(torch.isfinite(A).all()):
        raise ValueError("A contains NaN or Inf; a truncated SVD of it is undefined")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """BF16 GEMMs on CUDA (tensor cores), FP32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _gemm_flops(m: int, n: int, k: int) -> float:
    """2mnk weighted by the measured efficiency of a GEMM whose narrowest side is k (skinny
    products run below peak: ≈57% at k=40, 86% at 72, 93% at 136 on a 2-core EPYC)."""
    w = min(m, n, k)
    return 2.0 * m * n * k * (w + 16) / w


def gram_path_is_cheaper(m: int, n: int, rank: int, oversample: int, n_iter: int) -> bool:
    """Cost model (GEMM flops, tall m ≥ n) behind ``qr="auto"``'s choice of the exact Gram path.

    randomized: (2q+2) passes of width ℓ + the Gram of A Q (m ℓ²) + the fused lift (m ℓ k)
    gram:       ⅔ of AᵀA (block-symmetric) + c·n³ (eigh) + A V (m n k) + 2 m k² (factor, lift)
    With efficiency 1 and no eigh term this is the textbook rule n < (2q+2)(k+p).
    """
    ell = min(rank + oversample, n)
    randomized = ((2 * n_iter + 2) * _gemm_flops(m, n, ell) + _gemm_flops(ell, ell, m)
                  + _gemm_flops(m, ell, rank))
    gram = (2 / 3 * _gemm_flops(n, n, m) + _EIGH_FLOPS_PER_N3 * n**3 + _gemm_flops(m, n, rank)
            + 2 * _gemm_flops(m, rank, rank))
    return gram < randomized


@dataclass(frozen=True)
class SVDPath:
    """The algorithm a truncated-SVD call runs: ``gram`` (exact, eigh of AᵀA), ``randomized``
    (Halko–Martinsson–Tropp with ``n_iter`` power iterations and ``oversample`` extra columns),
    ``full`` (``torch.linalg.svd``) or ``lowrank`` (``torch.svd_lowrank``)."""
    kind: str
    n_iter: int | None = None
    oversample: int | None = None

    @property
    def label(self) -> str:
        """``gram``, ``full``, ``randomized q2 p8``, ``lowrank q2 p8``."""
        return self.kind if self.n_iter is None else f"{self.kind} q{self.n_iter} p{self.oversample}"


def svd_path(method: str, m: int, n: int, rank: int, *, n_iter: int, oversample: int, qr: str = "auto") -> SVDPath:
    """The path ``SVD_METHODS[method]`` takes on an (m, n) matrix: ``rsvd`` dispatches through this
    function, so the label a cache or benchmark records is the path that ran."""
    if method == "full_svd":
        return SVDPath("full")
    if method == "lowrank_svd":
        return SVDPath("lowrank", n_iter, oversample)
    if method != "rsvd":
        raise ValueError(f"svd method {method!r} is unknown; accepted: {', '.join(SVD_METHODS)}")
    if qr == "gram" or (qr == "auto" and gram_path_is_cheaper(max(m, n), min(m, n), rank, oversample, n_iter)):
        return SVDPath("gram")
    return SVDPath("randomized", n_iter, oversample)


def gram_matrix(A: Tensor, blocks: int = 3) -> Tensor:
    """Aᵀ A for A (b, m, n), computing only the upper block triangle (2/3 of the flops at 3 blocks).

    The missing block products are mirrored; 25% faster than one GEMM on a 2-core CPU at n=768.
    """
    n = A.shape[-1]
    if n < 32 * blocks:
        return A.mT @ A
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    G = A.new_empty(*A.shape[:-2], n, n)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            G[..., rows, cols] = block = A[..., rows].mT @ A[..., cols]
            if i != j:
                G[..., cols, rows] = block.mT
    return G


def _core_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factor_tall(B: Tensor, rank: int, orth: str, certify: bool,
                 timer: StageTimer | None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a tall block B (b, m, c) = U diag(S) Wh, truncated to ``rank``; core dtype.

    With ``certify``, entries whose columns are nearly orthogonal (as the Rayleigh–Ritz
    rotation makes them) take one certified CholQR step and the lift is fused into a single
    GEMM: U = B (R⁻¹ U_R). The others, and every entry when ``certify`` is off, go through the
    named orthonormaliser: B = Q R, R = U_R Σ Wᵀ, U = Q U_R.
    """
    dev = B.device
    with maybe_stage(timer, "final_qr", dev):
        if certify:
            R, ok = certified_cholqr(B)
            Q = None
        else:
            Q, R = orthonormalise(B, orth)
            ok = torch.ones(B.shape[0], dtype=torch.bool, device=dev)
    with maybe_stage(timer, "small_svd_fp32", dev):
        Ur, S, Wh = torch.linalg.svd(R, full_matrices=False)
        Ur, S, Wh = Ur[..., :rank], S[..., :rank], Wh[..., :rank, :]
    with maybe_stage(timer, "lift", dev):
        U = B @ torch.linalg.solve_triangular(R, Ur, upper=True) if Q is None else Q @ Ur
    if bool(ok.all()):
        return U, S, Wh
    bad = ~ok
    Ub, Sb, Whb = _factor_tall(B[bad], rank, orth, False, timer)
    U, S, Wh = U.clone(), S.clone(), Wh.clone()
    U[bad], S[bad], Wh[bad] = Ub, Sb, Whb
    return U, S, Wh


def _randomized(Ad: Tensor, Ac: Tensor, rank: int, n_iter: int, oversample: int, orth: str, certify: bool,
                core: torch.dtype, generator: torch.Generator | None, timer: StageTimer | None) -> SVDResult:
    """Tall (b, m, n) → (U (b, m, k), S (b, k), Vh (b, k, n)) in the core dtype; see module docstring.

    ``Ac`` (compute dtype) drives the subspace search; the factors come from one pass over
    ``Ad`` (A's own dtype). The last power iteration ends with a Rayleigh–Ritz rotation on the
    short side, so B = A Q has nearly orthogonal columns for the certified final step.
    """
    b, m, n = Ac.shape
    dev, cdt = Ac.device, Ac.dtype
    ell = min(rank + oversample, n)
    with maybe_stage(timer, "preparation", dev):
        omega = torch.randn(b, m, ell, device=dev, dtype=core, generator=generator).to(cdt)
    with maybe_stage(timer, "projection", dev):
        Q, _ = orthonormalise((Ac.mT @ omega).to(core), orth)
    with maybe_stage(timer, "power_iteration", dev):
        for _ in range(n_iter):
            Z = (Ac.mT @ (Ac @ Q.to(cdt))).to(core)
            H = Q.mT @ Z  # Rayleigh–Ritz: rotate onto the Ritz vectors of AᵀA in span(Q)
            Q, _ = orthonormalise(Z @ torch.linalg.eigh(0.5 * (H + H.mT))[1].flip(-1), orth)
    with maybe_stage(timer, "final_qr", dev):
        B = (Ad @ Q.to(Ad.dtype)).to(core)
    U, S, Wh = _factor_tall(B, rank, orth, certify and n_iter > 0, timer)
    with maybe_stage(timer, "lift", dev):
        return U, S, Wh @ Q.mT


def _gram(Ad: Tensor, Ac: Tensor, rank: int, orth: str, core: torch.dtype, timer: StageTimer | None) -> SVDResult:
    """Exact path through the eigendecomposition of Aᵀ A (compute dtype); U from A V at A's dtype."""
    dev = Ac.device
    with maybe_stage(timer, "projection", dev):
        # always FP32: a BF16-stored Gram matrix loses the subspace (1.9× the optimal error
        # measured at 8192×192, rank 64)
        G = gram_matrix(Ac if Ac.dtype == core else Ad.to(core))
    with maybe_stage(timer, "small_svd_fp32", dev):
        V = torch.linalg.eigh(0.5 * (G + G.mT))[1][..., -rank:].flip(-1)  # top-rank, descending
    with maybe_stage(timer, "final_qr", dev):
        Y = (Ad @ V.to(Ad.dtype)).to(core)
    U, S, Wh = _factor_tall(Y, rank, orth, True, timer)
    with maybe_stage(timer, "lift", dev):
        return U, S, Wh @ V.mT


def rsvd(A: Tensor, rank: int, *, n_iter: int = 2, oversample: int = 8, qr: str = "auto",
         compute_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
         timer: StageTimer | None = None) -> SVDResult:
    """Rank-``rank`` truncated SVD of ``A`` (..., m, n), tall or wide, any leading batch dims.

    Args:
        rank: 1 ≤ rank ≤ min(m, n).
        n_iter: power iterations (≥ 0); 2·n_iter + 2 passes over A on the randomized path.
        oversample: extra sketch columns p ≥ 0 (ℓ = min(rank + p, min(m, n))).
        qr: ``"auto"`` (a cost model picks the Gram or the randomized path, and the
            orthonormaliser is the device's fastest stable one, see ``kvsvd.orth.default_orth``),
            ``"gram"`` (exact path), or one orthonormaliser of :data:`kvsvd.orth.ORTH_METHODS`
            on the randomized path.
        compute_dtype: dtype of the passes that search the subspace (projection, power
            iterations, the Gram matrix); default BF16 on CUDA, FP32 on CPU. The one pass that
            forms the factors (A Q, or A V on the Gram path) runs at A's own dtype, so a BF16
            search only perturbs the subspace (a second-order effect on the error). Gram
            matrices, Cholesky and the small SVD are FP32 (FP64 for FP64 input).
        generator: a ``torch.Generator`` on A's device for a reproducible sketch.
        timer: a :class:`~kvsvd.timing.StageTimer` that accumulates per-stage milliseconds.

    Returns:
        ``U`` (..., m, rank) and ``Vh`` (..., rank, n) in A's dtype, ``S`` (..., rank) float32
        (float64 for float64 A), descending.
    """
    validate_svd_args(A, rank, n_iter, oversample, qr, compute_dtype)
    dev = A.device
    cdt = compute_dtype or default_compute_dtype(dev)
    if A.dtype == torch.float64 and compute_dtype is None:
        cdt = torch.float64
    core = _core_dtype(cdt)
    with maybe_stage(timer, "preparation", dev):
        batch, (m, n) = A.shape[:-2], A.shape[-2:]
        wide = m < n
        Ad = A.reshape(-1, m, n)
        Ad = Ad.mT if wide else Ad
        Ac = Ad.to(cdt)
    automatic = qr in ("auto", "gram")
    orth = default_orth(dev) if automatic else qr
    if svd_path("rsvd", m, n, rank, n_iter=n_iter, oversample=oversample, qr=qr).kind == "gram":
        U, S, Vh = _gram(Ad, Ac, rank, orth, core, timer)
    else:
        U, S, Vh = _randomized(Ad, Ac, rank, n_iter, oversample, orth, automatic, core, generator, timer)
    if wide:
        U, Vh = Vh.mT, U.mT
    return (U.to(A.dtype).reshape(*batch, m, rank), S.reshape(*batch, rank),
            Vh.to(A.dtype).reshape(*batch, rank, n))


def _baseline_args(A: Tensor, rank: int, n_iter: int, oversample: int) -> torch.dtype:
    validate_svd_args(A, rank, n_iter, oversample, "auto", None)
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def full_svd(A: Tensor, rank: int, *, n_iter: int = 2, oversample: int = 8, qr: str = "auto",
             compute_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
             timer: StageTimer | None = None) -> SVDResult:
    """Exact baseline: ``torch.linalg.svd`` in FP32 (FP64 for FP64 A), truncated to ``rank``.

    Takes rsvd's signature so methods swap by name; n_iter, oversample, qr, compute_dtype
    and generator do not apply to an exact SVD and are only validated.
    """
    core = _baseline_args(A, rank, n_iter, oversample)
    with maybe_stage(timer, "small_svd_fp32", A.device):
        U, S, Vh = torch.linalg.svd(A.to(core), full_matrices=False)
    return _owned(U[..., :rank], S[..., :rank], Vh[..., :rank, :], A.dtype)


def lowrank_svd(A: Tensor, rank: int, *, n_iter: int = 2, oversample: int = 8, qr: str = "auto",
                compute_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                timer: StageTimer | None = None) -> SVDResult:
    """Baseline: ``torch.svd_lowrank(A, q=rank+oversample, niter=n_iter)`` in FP32, truncated.

    Its sketch uses the global RNG; with a ``generator`` the call runs under a forked RNG
    seeded from it, so results are reproducible. qr and compute_dtype are only validated.
    """
    core = _baseline_args(A, rank, n_iter, oversample)
    q = min(rank + oversample, *A.shape[-2:])
    with maybe_stage(timer, "small_svd_fp32", A.device):
        if generator is None:
            U, S, V = torch.svd_lowrank(A.to(core), q=q, niter=n_iter)
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            devices = [A.device] if A.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                U, S, V = torch.svd_lowrank(A.to(core), q=q, niter=n_iter)
    return _owned(U[..., :rank], S[..., :rank], V[..., :rank].mT, A.dtype)


def _owned(U: Tensor, S: Tensor, Vh: Tensor, dtype: torch.dtype) -> SVDResult:
    """Truncated factors as tensors of their own: slices of the full factors would keep the
    whole (m × k) and (k × n) storages alive in whatever holds them (a cache segment)."""
    return U.to(dtype, copy=True), S.clone(), Vh.to(dtype, copy=True)


SVDFn = Callable[..., SVDResult]
SVD_METHODS: dict[str, SVDFn] = {"rsvd": rsvd, "full_svd": full_svd, "lowrank_svd": lowrank_svd}


def get_svd(name: str) -> SVDFn:
    """The SVD function registered under ``name`` (``rsvd``, ``full_svd``, ``lowrank_svd``)."""
    try:
        return SVD_METHODS[name]
    except KeyError:
        raise ValueError(f"svd method {name!r} is unknown; accepted: {', '.join(SVD_METHODS)}") from None


def truncation_error(A: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """‖A − U diag(S) Vh‖_F per batch entry, computed in FP64. Returns (...,)."""
    A64 = A.double()
    approx = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    return torch.linalg.matrix_norm(A64 - approx)


def singular_values(A: Tensor) -> Tensor:
    """All singular values of A (..., m, n) in FP64, descending: a QR of the tall orientation,
    then the SVD of its small R (as backward stable as an SVD of A; on a GPU a tall SVD is far
    slower than its QR). Returns (..., min(m, n)) float64."""
    A64 = A.double()
    A64 = A64.mT if A64.shape[-2] < A64.shape[-1] else A64
    return torch.linalg.svdvals(torch.linalg.qr(A64, mode="r")[1])


def optimal_error(A: Tensor, rank: int) -> Tensor:
    """Eckart–Young optimum ‖A − A_rank‖_F = sqrt(Σ_{i>rank} σ_i²), FP64. Returns (...,)."""
    return singular_values(A)[..., rank:].pow(2).sum(-1).sqrt()


__all__ = ["rsvd", "full_svd", "lowrank_svd", "SVD_METHODS", "QR_METHODS", "get_svd", "SVDPath", "svd_path",
           "gram_path_is_cheaper", "gram_matrix", "truncation_error", "optimal_error", "singular_values",
           "validate_svd_args"]
