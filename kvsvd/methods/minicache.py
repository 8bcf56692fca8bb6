"""``minicache``: SLERP-merge a pair of adjacent layers token by token (MiniCache, Liu et al. 2024).

For every (token, head) the two layers' vectors are split into norms and unit directions;
the directions are merged by SLERP with weight t (linear interpolation below Ω = 1e-7) and
each layer later rescales the shared direction by its own norm. Tokens whose mean angle
over heads exceeds Ωmin + γ(Ωmax − Ωmin) (per sequence) are divergent and are retained
unmerged, as the MiniCache paper does; the retained fraction is visible in the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..checks import choice, number
from ..store import FLOAT_DTYPES, DenseStore, MergedStore
from .base import Method

if TYPE_CHECKING:
    from ..config import CompressionConfig


@dataclass(frozen=True)
class MiniCacheParams:
    """``minicache`` settings: SLERP weight ``t`` ∈ (0, 1) and retention threshold ``gamma`` ∈ [0, 1] (tokens
    whose angle exceeds Ωmin + γ·(Ωmax − Ωmin) are kept unmerged); ``factor_dtype`` stores the merged
    directions and norms (bf16, fp16 or fp32)."""
    t: float = 0.5
    gamma: float = 0.05
    factor_dtype: str = "bf16"

    def __post_init__(self) -> None:
        choice("factor_dtype", self.factor_dtype, tuple(FLOAT_DTYPES))
        number("t", self.t, "a number in (0, 1)", lambda t: 0 < t < 1)
        number("gamma", self.gamma, "a number in [0, 1]", lambda g: 0 <= g <= 1)


def compress(x: torch.Tensor, config: CompressionConfig, *, kind: str, layers: list[int], heads: int,
             calibration=None, timer=None) -> DenseStore | MergedStore:
    B, T, G, F = x.shape
    p = config.params
    if G != 2:
        raise ValueError(f"minicache merges layer pairs; got a group of {G} layers")
    v = x.float().reshape(B, T, 2, heads, F // heads)
    norms = v.norm(dim=-1)                                      # (B, T, 2, H)
    unit = v / norms.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).tiny)
    omega = (unit[:, :, 0] * unit[:, :, 1]).sum(-1).clamp(-1.0, 1.0).acos()   # (B, T, H)
    t = p.t
    small = omega < 1e-7
    sin_o = omega.sin().clamp_min(torch.finfo(torch.float32).tiny)
    wa = torch.where(small, torch.full_like(omega, 1 - t), ((1 - t) * omega).sin() / sin_o)
    wb = torch.where(small, torch.full_like(omega, t), (t * omega).sin() / sin_o)
    direction = wa.unsqueeze(-1) * unit[:, :, 0] + wb.unsqueeze(-1) * unit[:, :, 1]
    angle = omega.mean(-1)                                       # (B, T)
    lo, hi = angle.amin(-1, keepdim=True), angle.amax(-1, keepdim=True)
    merged = angle <= lo + p.gamma * (hi - lo)
    dt = FLOAT_DTYPES[p.factor_dtype]
    return MergedStore(merged=merged, directions=direction[merged].to(dt),
                       norms=norms.transpose(-1, -2)[merged].to(dt),
                       retained=x[~merged].to(FLOAT_DTYPES[config.dense_dtype], copy=True))


@dataclass(frozen=True)
class MiniCache(Method):
    """Layer pairs merged by SLERP; no ranks (a ratio cannot size it: its bytes follow γ)."""

    def label_parts(self, spec: dict, field: Callable[[str], Any]) -> list[str]:
        return [field("factor_dtype")]


MINICACHE = MiniCache("minicache", "kvsvd", group_size=2, params=MiniCacheParams, compress=compress, fixed_group=True,
                      ranked=False)
