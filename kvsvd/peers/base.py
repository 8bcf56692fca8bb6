"""What a peer is to the grid: a dataclass of its keys that builds its cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Peer:
    """A grid method whose cache kvsvd does not implement. Subclasses set ``name`` (the grid's ``method``)
    and ``family`` (the report's), and declare their keys as fields."""
    name: ClassVar[str]
    family: ClassVar[str]

    @classmethod
    def keys(cls) -> set[str]:
        """The keys its grid entry takes."""
        return {"method", *(f.name for f in dataclasses.fields(cls))}

    @classmethod
    def of(cls, spec: dict) -> "Peer":
        """The peer a grid method dict names; a key it does not take or a missing one is refused by name."""
        foreign = set(spec) - cls.keys()
        if foreign:
            raise ValueError(f"key(s) {sorted(foreign)} do not apply to method {cls.name!r}; accepted: "
                             f"{sorted(cls.keys())}")
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(spec)
        if missing:
            raise ValueError(f"method {cls.name!r} needs key(s) {sorted(missing)}")
        return cls(**{k: v for k, v in spec.items() if k != "method"})

    @property
    def package(self) -> str | None:
        """The module it runs in (kvsvd's ``peers`` extra), or None."""
        return None

    @property
    def eager(self) -> bool:
        """Whether it reads eager attention weights: its cells then run a prefill of their own."""
        return False

    @property
    def calibration(self) -> None:
        """A peer codes on no kvsvd calibration."""
        return None

    def build(self, model, context_tokens: int, reserve_tokens: int = 0, memoize_reads: bool = False) -> tuple[Any, Any]:
        """(cache, press or None) at a context of ``context_tokens`` tokens; a ratio budgets ``reserve_tokens``
        more tokens held dense after the context."""
        raise NotImplementedError

    def label(self, budget: str) -> str:
        """What was asked (``budget``: the ratio's words, `` 4x``, or empty)."""
        raise NotImplementedError

    def path(self, cache, model_config) -> str:
        """The path every one of its K/V matrices runs (``dense bf16``, ``quanto int4``)."""
        raise NotImplementedError
