"""The dense references: the model's own ``DynamicCache`` and the 16-bit cache that defines 1×."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DynamicCache

from ..accounting import dtype_name
from ..dense import Dense16Cache
from .base import Peer


@dataclass(frozen=True)
class Dense(Peer):
    """``method: none``: transformers' ``DynamicCache`` in the model dtype (every grid's reference), built from
    the model's config so that a hybrid model's sliding layers keep their window, as in generate."""
    name = "none"
    family = "dense"

    def build(self, model, context_tokens: int, reserve_tokens: int = 0,
              memoize_reads: bool = False) -> tuple[DynamicCache, None]:
        return DynamicCache(config=model.config), None

    def label(self, budget: str) -> str:
        return "dense"

    def path(self, cache, model_config) -> str:
        return f"dense {dtype_name(next(layer.keys.dtype for layer in cache.layers if layer.is_initialized))}"


@dataclass(frozen=True)
class Dense16(Peer):
    """``method: dense16``: every K/V entry stored in bf16 (``kvsvd.dense.Dense16Cache``)."""
    name = "dense16"
    family = "dense 16-bit"

    def build(self, model, context_tokens: int, reserve_tokens: int = 0,
              memoize_reads: bool = False) -> tuple[Dense16Cache, None]:
        return Dense16Cache(model.config), None

    def label(self, budget: str) -> str:
        return "dense bf16"

    def path(self, cache, model_config) -> str:
        return "dense bf16"
