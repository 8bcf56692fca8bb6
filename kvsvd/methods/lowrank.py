"""``svd`` and ``xkv``: truncated SVD of the (tokens × G·F) matrix of a layer group (G=1: per layer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..store import DenseStore, LowRankStore
from ..svd import get_svd, svd_path
from ..timing import StageTimer
from .base import SVD_FIELDS, Method

if TYPE_CHECKING:
    from ..config import CompressionConfig


def compress(x: torch.Tensor, rank: int, config: CompressionConfig, *, kind: str, layers: list[int], heads: int,
             calibration=None, timer: StageTimer | None = None) -> DenseStore | LowRankStore:
    """One shared token factor U (B, T, rank) for the group; W = diag(S)·Vh (B, rank, G·F)."""
    B, T, G, F = x.shape
    if rank >= T:  # a segment shorter than the rank is cheaper (and exact) stored as it is
        return DenseStore.build(x, config.dense_dtype)
    gen = torch.Generator(device=x.device).manual_seed(config.seed)
    U, S, Vh = get_svd(config.svd)(x.reshape(B, T, G * F), rank, n_iter=config.n_iter,
                                   oversample=config.oversample, qr=config.qr, generator=gen, timer=timer)
    path = svd_path(config.svd, T, G * F, rank, n_iter=config.n_iter, oversample=config.oversample, qr=config.qr)
    return LowRankStore.build(U, S.unsqueeze(-1) * Vh.to(S.dtype), F, config.factor_dtype, path.label)


FIELDS = ("rank_k", "rank_v", "factor_dtype", *SVD_FIELDS)
SVD = Method("svd", "kvsvd", group_size=1, fields=FIELDS, compress=compress, fixed_group=True)
# groups of 4 layers by default, as in the xKV paper
XKV = Method("xkv", "kvsvd", group_size=4, fields=FIELDS, compress=compress)
