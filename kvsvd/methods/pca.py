"""``pca``: project each layer onto fixed calibrated bases (no SVD at run time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..store import DenseStore, LowRankStore
from .base import Method

if TYPE_CHECKING:
    from ..cache import LowRankCache
    from ..calibrate import Calibration
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


@dataclass(frozen=True)
class Pca(Method):
    """Per-layer bases calibrated once per model (``kvsvd calibrate``, ``layer_group_size`` 1)."""

    def check(self, config: CompressionConfig) -> None:
        super().check(config)
        if not config.calibration_path:
            raise ValueError("method='pca' needs calibration_path (a file written by `python -m kvsvd calibrate MODEL "
                             "--layer-group-size 1`)")

    def prepare(self, cache: LowRankCache, groups: list[list[int]]) -> Calibration:
        from ..calibrate import Calibration
        cfg = cache.config
        return Calibration.load(cfg.calibration_path, cache.model_config, cfg.rank_k, cfg.rank_v)


PCA = Pca("pca", "kvsvd", group_size=1, fields=("rank_k", "rank_v", "factor_dtype", "calibration_path"),
          compress=compress, fixed_group=True)
