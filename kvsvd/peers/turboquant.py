"""The turboquant package's ``TurboQuantCache``: a random rotation, then a Lloyd-Max codebook per entry."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Peer


@dataclass(frozen=True)
class TurboQuant(Peer):
    """``method: turboquant``: ``nbits`` per entry, indices held in uint8."""
    name = "turboquant"
    family = "quantized cache"
    nbits: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.nbits, bool) or not isinstance(self.nbits, int) or self.nbits < 1:
            raise ValueError(f"nbits={self.nbits!r} is out of range; accepted: an int >= 1")

    @property
    def package(self) -> str:
        return "turboquant"

    def build(self, model, context_tokens: int, reserve_tokens: int = 0, memoize_reads: bool = False):
        from turboquant import TurboQuantCache
        return TurboQuantCache(bits=self.nbits), None

    def label(self, budget: str) -> str:
        return f"turboquant {self.nbits}-bit"

    def path(self, cache, model_config) -> str:
        return f"turboquant {self.nbits}-bit, uint8 indices"
