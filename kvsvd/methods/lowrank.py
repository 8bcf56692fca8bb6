"""``svd`` and ``xkv``: truncated SVD of the (tokens × G·F) matrix of a layer group (G=1: per layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..store import DenseStore, LowRankStore
from ..svd import get_svd, svd_path
from ..timing import StageTimer
from .base import Method, Ranks, SvdCall

if TYPE_CHECKING:
    from ..config import CompressionConfig


@dataclass(frozen=True)
class LowRankParams(Ranks, SvdCall):
    """``svd`` / ``xkv`` settings: the ranks and factor storage (:class:`~kvsvd.methods.base.Ranks`) and the SVD
    call (:class:`~kvsvd.methods.base.SvdCall`)."""

    def __post_init__(self) -> None:
        Ranks.__post_init__(self)
        SvdCall.__post_init__(self)


def compress(x: torch.Tensor, config: CompressionConfig, *, kind: str, layers: list[int], heads: int,
             calibration=None, timer: StageTimer | None = None) -> DenseStore | LowRankStore:
    """One shared token factor U (B, T, rank) for the group; W = diag(S)·Vh (B, rank, G·F)."""
    B, T, G, F = x.shape
    p = config.params
    rank = p.rank(kind)
    if rank >= T:  # a segment shorter than the rank is cheaper (and exact) stored as it is
        return DenseStore.build(x, config.dense_dtype)
    gen = torch.Generator(device=x.device).manual_seed(p.seed)
    U, S, Vh = get_svd(p.svd)(x.reshape(B, T, G * F), rank, n_iter=p.n_iter, oversample=p.oversample, qr=p.qr,
                              generator=gen, timer=timer)
    path = svd_path(p.svd, T, G * F, rank, n_iter=p.n_iter, oversample=p.oversample, qr=p.qr)
    return LowRankStore.build(U, S.unsqueeze(-1) * Vh.to(S.dtype), F, p.factor_dtype, path.label)


SVD = Method("svd", "kvsvd", group_size=1, params=LowRankParams, compress=compress, fixed_group=True)
# groups of 4 layers by default, as in the xKV paper
XKV = Method("xkv", "kvsvd", group_size=4, params=LowRankParams, compress=compress)
