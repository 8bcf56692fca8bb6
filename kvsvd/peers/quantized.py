"""transformers' ``QuantizedCache`` (KIVI-style), on the optimum-quanto or HQQ backend."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import choice
from .base import Peer

BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}


@dataclass(frozen=True)
class Quantized(Peer):
    """``method: quantized``: ``nbits`` per entry on ``backend``, the newest ``residual_length`` tokens kept in
    the model dtype (transformers' default window)."""
    name = "quantized"
    family = "quantized cache"
    backend: str = "quanto"
    nbits: int = 4
    residual_length: int = 128

    def __post_init__(self) -> None:
        choice("backend", self.backend, tuple(BACKENDS))
        for name, lo in (("nbits", 1), ("residual_length", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}={value!r} is out of range; accepted: an int >= {lo}")

    @property
    def package(self) -> str:
        return BACKENDS[self.backend]

    def build(self, model, context_tokens: int, reserve_tokens: int = 0, memoize_reads: bool = False):
        from transformers import QuantizedCache
        return QuantizedCache(backend=self.backend, config=model.config, nbits=self.nbits,
                              residual_length=self.residual_length), None

    def label(self, budget: str) -> str:
        return f"quantized {self.backend} int{self.nbits}"

    def path(self, cache, model_config) -> str:
        return f"{self.backend} int{self.nbits}"
