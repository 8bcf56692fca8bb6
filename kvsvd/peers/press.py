"""kvpress presses: token eviction from a 16-bit cache (``Dense16Cache``), through kvpress's own classes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib.metadata import version

from ..accounting import ModelShape
from ..checks import choice
from ..dense import Dense16Cache
from .base import Peer

# the grid's press names and kvpress's classes
PRESSES = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress", "knorm": "KnormPress",
           "expected_attention": "ExpectedAttentionPress", "pyramidkv": "PyramidKVPress", "tova": "TOVAPress",
           "observed_attention": "ObservedAttentionPress"}


@dataclass(frozen=True)
class Press(Peer):
    """``method: press``: kvpress's ``press`` pruning the context to 1/``ratio`` of a 16-bit cache's bytes
    (compression_ratio = 1 − kept / T, the kept tokens counting the reserved ones)."""
    name = "press"
    family = "kvpress"
    press: str
    ratio: float = 2.0

    def __post_init__(self) -> None:
        choice("press", self.press, tuple(PRESSES))
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio > 1:
            raise ValueError(f"ratio={self.ratio!r} is out of range; accepted: > 1")

    @property
    def package(self) -> str:
        return "kvpress"

    @property
    def eager(self) -> bool:
        return self.press == "observed_attention"  # it reads the attention weights

    def build(self, model, context_tokens: int, reserve_tokens: int = 0, memoize_reads: bool = False):
        import kvpress
        if ModelShape.of(model.config).sliding_window is not None:
            raise ValueError(
                f"press={self.press!r} does not run on a model with sliding-window layers: kvpress "
                f"{version('kvpress')} prunes every layer, so a sliding layer holds fewer tokens than the model's "
                "sliding-window mask expects (on a tiny Gemma 3: 'The size of tensor a (4) must match the size of "
                "tensor b (16)'; expected_attention: no 'None_inv_freq' on Gemma3RotaryEmbedding); accepted: a "
                "model whose layers are all full attention")
        T = context_tokens
        kept = (T + reserve_tokens) / self.ratio - reserve_tokens  # context tokens the press may keep
        if kept < 1:  # kvpress keeps at least one token: the row's measured kv_ratio falls short of the ratio
            warnings.warn(f"ratio={self.ratio} is out of reach for a press: the {reserve_tokens} question and decode "
                          f"tokens alone hold more than 1/{self.ratio} of {T + reserve_tokens} tokens; it keeps 1 "
                          "context token (the fewest kvpress keeps) and the row's kv_ratio says what it held",
                          stacklevel=2)
            kept = 1
        return Dense16Cache(model.config), getattr(kvpress, PRESSES[self.press])(compression_ratio=1 - kept / T)

    def label(self, budget: str) -> str:
        return f"{self.press}{budget}"

    def path(self, cache, model_config) -> str:
        return f"{self.press} eviction, dense bf16"
