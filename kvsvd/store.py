"""What a compressed segment holds, per group and per K or V.

A *store* covers one token segment of one layer group for keys or values. Every store has:

- ``layer(j, dtype)``: layer j's slice rebuilt as ``(B, T, F)`` (F = kv_heads · head_dim);
- ``latent(j, heads)``: layer j as :class:`Factors` x ≈ u·w (+ mean), which ``kvsvd.attention``
  attends without rebuilding x, or None where the store has no such form;
- ``held()``: every tensor it holds, by kind (``kvsvd.accounting`` counts them);
- ``path``: what produced it and how it is held: ``randomized q2 p8 bf16``, ``gram int8``,
  ``full fp32``, ``pca bf16``, ``minicache bf16``, ``dense bf16`` (a segment kept as it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .accounting import STORAGE_DTYPES as FLOAT_DTYPES, dtype_name

Tensor = torch.Tensor


def quantize_rows(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantisation of x (..., r) to ``bits`` ∈ {4, 8}.

    Returns ``(q, scale)``: q int8 (..., r) for 8 bits, or uint8 (..., ⌈r/2⌉) holding two
    4-bit values per byte; scale bf16 (..., 1). Values are in [−(2^(bits−1)−1), 2^(bits−1)−1].
    """
    qmax = (1 << (bits - 1)) - 1
    scale = (x.abs().amax(-1, keepdim=True).float() / qmax).to(torch.bfloat16)
    q = torch.round(x.float() / scale.float().clamp_min(torch.finfo(torch.float32).tiny))
    q = q.clamp(-qmax, qmax).to(torch.int8)
    if bits == 4:
        if q.shape[-1] % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        q = ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).to(torch.uint8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, bits: int, r: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`quantize_rows` → (..., r) in ``dtype``."""
    if bits == 4:
        lo = (q & 0xF).to(torch.int8)
        hi = (q >> 4).to(torch.int8)
        q = torch.stack(((lo ^ 8) - 8, (hi ^ 8) - 8), dim=-1).flatten(-2)[..., :r]
    return (q.to(torch.float32) * scale.float()).to(dtype)


@dataclass
class CodedColumns:
    """Columns of a token factor held as integer codes, read without dequantising them: in each block
    of ``block`` tokens, u = q·step + mean. q float32 (B, T, n) holds the codes' values in steps, centred on
    zero (a scalar code's integers or half-integers, exact in float32, or a codebook's points); step and mean
    float32 (B, ⌈T/block⌉, n) the blocks' per-column quantiser step and offset.

    Attention reads a·uᵀ and p·u with the quantiser folded into the small operand, block by block:
    a·uᵀ = q·(step ⊙ aᵀ) + mean·aᵀ, so u itself is never written out (when the other operand has more
    rows than a block has tokens, u is rebuilt instead, once for every layer that reads these columns:
    folding would cost more)."""
    q: Tensor
    step: Tensor
    mean: Tensor
    block: int
    rebuilt: Tensor | None = field(default=None, repr=False)  # u, kept once a read with many rows rebuilt it

    def _blocks(self):
        """(codes, slice of blocks): whole blocks (B, k, block, n), then the partial last one (B, 1, ·, n)."""
        B, T, n = self.q.shape
        whole = T // self.block
        if whole:
            yield self.q[:, :whole * self.block].view(B, whole, self.block, n), slice(0, whole)
        if T % self.block:
            yield self.q[:, whole * self.block:].unsqueeze(1), slice(whole, whole + 1)

    def dense(self) -> Tensor:
        """u float32 (B, T, n)."""
        return torch.cat([(x * self.step[:, sl, None] + self.mean[:, sl, None]).flatten(1, 2)
                          for x, sl in self._blocks()], 1)

    def _rebuilt(self) -> Tensor:
        if self.rebuilt is None:
            self.rebuilt = self.dense()
        return self.rebuilt

    def scores(self, a: Tensor) -> Tensor:
        """a (B, M, n) → a·uᵀ (B, M, T)."""
        if a.shape[1] > self.block:
            return a @ self._rebuilt().mT
        w = self.step[..., None] * a.mT[:, None]                                    # (B, blocks, n, M)
        c = self.mean @ a.mT                                                       # (B, blocks, M)
        return torch.cat([(x @ w[:, sl] + c[:, sl, None]).flatten(1, 2) for x, sl in self._blocks()], 1).mT

    def sums(self, p: Tensor) -> Tensor:
        """p (B, M, T) → p·u (B, M, n)."""
        if p.shape[1] > self.block:
            return p @ self._rebuilt()
        out, start = 0, 0
        for x, sl in self._blocks():
            k, L = x.shape[1:3]
            pb = p[..., start:start + k * L].unflatten(-1, (k, L)).transpose(1, 2)   # (B, k, M, L)
            out = out + ((pb @ x) * self.step[:, sl, None]).sum(1) + pb.sum(-1).mT @ self.mean[:, sl]
            start += k * L
        return out


def _u_scores(u: "Tensor | list[CodedColumns]", a: Tensor) -> Tensor:
    """a (B, M, r) · uᵀ → (B, M, T); coded u by its column runs."""
    if isinstance(u, Tensor):
        return a @ u.float().mT
    splits = a.split([part.q.shape[-1] for part in u], -1)
    return sum(part.scores(x) for part, x in zip(u, splits, strict=True))


def _u_sums(u: "Tensor | list[CodedColumns]", p: Tensor) -> Tensor:
    """p (B, M, T) · u → (B, M, r)."""
    if isinstance(u, Tensor):
        return p @ u.float()
    return torch.cat([part.sums(p) for part in u], -1)


@dataclass
class Factors:
    """One layer's x ≈ u @ w (+ mean): u (B, T, r) as stored (float32/bfloat16/float16: the Triton
    kernel reads it as is, the PyTorch path upcasts) or as integer codes, its columns in runs of
    :class:`CodedColumns`; w (B|1, r, H, d) and mean (B|1, H, d) or None float32."""
    u: "Tensor | list[CodedColumns]"
    w: Tensor
    mean: Tensor | None = None

    def token_factor(self) -> Tensor:
        """u float32 (B, T, r), coded columns dequantised."""
        return self.u.float() if isinstance(self.u, Tensor) else torch.cat([part.dense() for part in self.u], -1)

    def scores(self, q: Tensor) -> Tensor:
        """q (B, H, g, n, d) → q·xᵀ (B, H, g, n, T); u is read once for every head."""
        B, H, g, n, _ = q.shape
        qe = torch.einsum("bhgnd,brhd->bhgnr", q, self.w.expand(B, -1, -1, -1))       # (B, H, g, n, r)
        s = _u_scores(self.u, qe.reshape(B, H * g * n, -1)).reshape(B, H, g, n, -1)
        if self.mean is not None:
            s = s + torch.einsum("bhgnd,bhd->bhgn", q, self.mean.expand(B, -1, -1))[..., None]
        return s

    def combine(self, p: Tensor) -> Tensor:
        """p (B, H, g, n, T) → p·x (B, H, g, n, d)."""
        B, H, g, n, _ = p.shape
        pu = _u_sums(self.u, p.reshape(B, H * g * n, -1)).reshape(B, H, g * n, -1)     # (B, H, g·n, r)
        o = torch.einsum("bhmr,brhd->bhmd", pu, self.w.expand(B, -1, -1, -1)).reshape(B, H, g, n, -1)
        if self.mean is not None:
            o = o + p.sum(-1, keepdim=True) * self.mean[:, :, None, None]
        return o


@runtime_checkable
class Store(Protocol):
    """What every store provides: ``DenseStore``, ``LowRankStore``, ``MergedStore`` and
    ``kvsvd.methods.transform.TransformStore`` (tests/test_attention.py loops over them)."""
    path: str

    def layer(self, j: int, dtype: torch.dtype) -> Tensor:
        """Layer j of the group rebuilt: (B, T, F) in ``dtype``."""

    def latent(self, j: int, heads: int) -> Factors | None:
        """Layer j as x ≈ u·w (+ mean) for attention to read without rebuilding x, or None."""

    def held(self) -> dict[str, list[Tensor]]:
        """Every tensor held, by kind of ``kvsvd.accounting.KINDS``."""


@dataclass
class DenseStore:
    """Uncompressed K or V of a group segment: x (B, T, G, F) in a storage dtype."""
    x: Tensor

    @classmethod
    def build(cls, x: Tensor, dense_dtype: str) -> "DenseStore":
        return cls(x.to(FLOAT_DTYPES[dense_dtype], copy=True))

    @property
    def path(self) -> str:
        return f"dense {dtype_name(self.x.dtype)}"

    def layer(self, j: int, dtype: torch.dtype) -> Tensor:
        return self.x[:, :, j].to(dtype)

    def latent(self, j: int, heads: int) -> None:
        return None

    def held(self) -> dict[str, list[Tensor]]:
        return {"uncompressed": [self.x]}


@dataclass
class LowRankStore:
    """x ≈ u @ w (+ mean): u (B, T, r) the token factor (float, or int8/int4 with per-token
    scales), w (B|1, r, G·F) the right factor with the singular values folded in; ``mean``
    (1, 1, G·F) and a shared w are calibration tensors (pca). ``path``: the factorisation that
    produced u and w and the token factor's dtype, e.g. ``randomized q2 p8 int8``."""
    u: Tensor
    w: Tensor
    features: int
    path: str
    scale: Tensor | None = None
    bits: int = 0
    rank: int = 0
    mean: Tensor | None = None

    @classmethod
    def build(cls, u: Tensor, w: Tensor, features: int, factor_dtype: str, path: str, mean: Tensor | None = None,
              shared_w: bool = False) -> "LowRankStore":
        """``path``: the label of what produced the factors (``kvsvd.svd.SVDPath.label``, or ``pca``)."""
        label = f"{path} {factor_dtype}"
        if factor_dtype in FLOAT_DTYPES:
            dt = FLOAT_DTYPES[factor_dtype]
            return cls(u.to(dt), w if shared_w else w.to(dt), features, label, mean=mean)
        bits = 8 if factor_dtype == "int8" else 4
        q, scale = quantize_rows(u, bits)
        return cls(q, w if shared_w else w.to(torch.bfloat16), features, label, scale, bits, u.shape[-1], mean)

    def token_factor(self) -> Tensor:
        """u as stored when float (no copy), int8/int4 ones dequantised to float32 (a copy)."""
        return self.u if self.bits == 0 else dequantize_rows(self.u, self.scale, self.bits, self.rank, torch.float32)

    def layer(self, j: int, dtype: torch.dtype) -> Tensor:
        cols = slice(j * self.features, (j + 1) * self.features)
        out = self.token_factor().to(torch.float32) @ self.w[..., cols].to(torch.float32)
        if self.mean is not None:
            out = out + self.mean[..., cols].to(torch.float32)
        return out.to(dtype)

    def latent(self, j: int, heads: int) -> Factors:
        """The :meth:`token_factor` (int8/int4 ones dequantised each step: a fused kernel would avoid it)."""
        cols = slice(j * self.features, (j + 1) * self.features)
        w = self.w[..., cols].float().unflatten(-1, (heads, self.features // heads))
        mean = None if self.mean is None else self.mean[:, 0, cols].float().unflatten(-1, (heads, -1))
        return Factors(self.token_factor(), w, mean)

    def held(self) -> dict[str, list[Tensor]]:
        out: dict[str, list[Tensor]] = {"factors": [self.u]}
        if self.mean is None:
            out["factors"].append(self.w)
        else:  # w and mean are the calibrated basis, shared by every sequence
            out["calibration"] = [self.w, self.mean]
        if self.scale is not None:
            out["scales"] = [self.scale]
        return out


@dataclass
class MergedStore:
    """MiniCache: a layer pair shares unit directions per merged (token, head); each layer keeps
    its own magnitudes; retained (divergent) tokens are stored unmerged.

    merged: bool (B, T) — tokens that were merged; directions (N_merged, H, d);
    norms (N_merged, H, 2); retained (N_retained, 2, H·d) in the dense storage dtype.
    """
    merged: Tensor
    directions: Tensor
    norms: Tensor
    retained: Tensor

    @property
    def path(self) -> str:
        return f"minicache {dtype_name(self.directions.dtype)}"

    def layer(self, j: int, dtype: torch.dtype) -> Tensor:
        B, T = self.merged.shape
        H, d = self.directions.shape[-2:]
        out = torch.empty(B, T, H * d, dtype=dtype, device=self.merged.device)
        out[self.merged] = (self.directions.float() * self.norms[..., j:j + 1].float()).flatten(-2).to(dtype)
        out[~self.merged] = self.retained[:, j].to(dtype)
        return out

    def latent(self, j: int, heads: int) -> None:
        return None

    def held(self) -> dict[str, list[Tensor]]:
        return {"factors": [self.directions, self.norms], "index": [self.merged], "uncompressed": [self.retained]}
