"""Argument checks whose errors name the parameter and the accepted range."""

from __future__ import annotations

from typing import Callable


def integer(name: str, value: object, lo: int) -> None:
    """``value`` must be an int (not a bool) ≥ ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}={value} is out of range; accepted: >= {lo}")


def number(name: str, value: object, accepted: str, within: Callable[[float], bool]) -> None:
    """``value`` must be a number (not a bool) for which ``within`` holds; ``accepted`` says which."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not within(value):
        raise ValueError(f"{name}={value!r} is out of range; accepted: {accepted}")


def choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    """``value`` must be one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(accepted)}")
