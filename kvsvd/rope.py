"""Exact rotary-embedding rotation and its inverse, from the cos/sin a model hands its cache.

For RoPE in the ``rotate_half`` convention k_rot = k·cos + rotate_half(k)·sin, with cos/sin
duplicated over the two halves; the inverse is (k_rot·cos − rotate_half(k_rot)·sin) /
(cos² + sin²), which also undoes an ``attention_scaling`` folded into cos/sin.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """k (B, H, T, d); cos, sin (B, T, d) → rotated keys (B, H, T, d)."""
    cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
    return k * cos + rotate_half(k) * sin


def invert_rope(k_rot: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The pre-RoPE keys (B, H, T, d) from post-RoPE keys and the same cos, sin (B, T, d)."""
    cos, sin = cos.unsqueeze(1).to(k_rot.dtype), sin.unsqueeze(1).to(k_rot.dtype)
    return (k_rot * cos - rotate_half(k_rot) * sin) / (cos * cos + sin * sin)
