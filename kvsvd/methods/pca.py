"""``pca``: project each layer onto fixed calibrated bases (no SVD at run time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..store import DenseStore, LowRankStore

if TYPE_CHECKING:
    from ..config import CompressionConfig


def compress(x: torch.Tensor, rank: int, config: CompressionConfig, *, kind: str, layers: list[int], heads: int,
             calibration=None, timer=None) -> DenseStore | LowRankStore:
    """u = (x − mean) P, P (F, rank) the layer's first ``rank`` calibrated principal directions."""
    B, T, G, F = x.shape
    if rank >= T:
        return DenseStore.build(x, config.dense_dtype)
    mean, basis = calibration.basis(layers[0], kind)
    P = basis[:, :rank]
    u = (x[:, :, 0].to(P.dtype) - mean) @ P
    return LowRankStore.build(u, P.mT.unsqueeze(0), F, config.factor_dtype, "pca", mean=mean.reshape(1, 1, F),
                              shared_w=True)
