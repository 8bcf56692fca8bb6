"""``pca``: project each layer onto fixed calibrated bases (no SVD at run time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..store import DenseStore, LowRankStore
from .base import Method, Ranks

if TYPE_CHECKING:
    from ..cache import LowRankCache
    from ..calibrate import Calibration
    from ..config import CompressionConfig


@dataclass(frozen=True)
class PcaParams(Ranks):
    """``pca`` settings: the ranks and factor storage, and ``calibration_path`` (required), a safetensors file
    written by ``kvsvd calibrate`` with ``layer_group_size`` 1."""
    calibration_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.calibration_path:
            raise ValueError("method='pca' needs calibration_path (a file written by `python -m kvsvd calibrate MODEL "
                             "--layer-group-size 1`)")


def compress(x: torch.Tensor, config: CompressionConfig, *, kind: str, layers: list[int], heads: int,
             calibration=None, timer=None) -> DenseStore | LowRankStore:
    """u = (x − mean) P, P (F, rank) the layer's first ``rank`` calibrated principal directions."""
    B, T, G, F = x.shape
    rank = config.params.rank(kind)
    if rank >= T:
        return DenseStore.build(x, config.dense_dtype)
    mean, basis = calibration.basis(layers[0], kind)
    P = basis[:, :rank]
    u = (x[:, :, 0].to(P.dtype) - mean) @ P
    return LowRankStore.build(u, P.mT.unsqueeze(0), F, config.params.factor_dtype, "pca", mean=mean.reshape(1, 1, F),
                              shared_w=True)


@dataclass(frozen=True)
class Pca(Method):
    """Per-layer bases calibrated once per model (``kvsvd calibrate``, ``layer_group_size`` 1)."""

    def prepare(self, cache: LowRankCache, groups: list[list[int]]) -> Calibration:
        from ..calibrate import Calibration
        p = cache.config.params
        return Calibration.load(p.calibration_path, cache.model_config, p.rank_k, p.rank_v)


PCA = Pca("pca", "kvsvd", group_size=1, params=PcaParams, compress=compress, fixed_group=True)
