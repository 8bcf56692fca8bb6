"""Byte budgets: what a method may hold at a ratio against a 16-bit dense cache (``kvsvd.accounting``
counts what it does hold)."""

from __future__ import annotations

from .accounting import ENTRY_BYTES, STORAGE_DTYPES, ModelShape, dense16_bytes, factor_entry_bytes
from .checks import choice


def dense_bytes(model_config, tokens: int, compressed: list[int], kept_tokens: int, dense_dtype: str) -> float:
    """What a cache of ``tokens`` tokens holds besides the compressed segments of layers ``compressed``: every
    token an uncompressed layer holds (a sliding layer its window) and ``kept_tokens`` (window, sinks) of the
    compressed ones, in ``dense_dtype``. (Pre-RoPE keys are re-rotated from their positions, which contiguous
    positions hold in no bytes.)"""
    shape = ModelShape.of(model_config)
    held = sum(n for l, n in enumerate(shape.tokens_held(tokens)) if l not in compressed)
    return ENTRY_BYTES[dense_dtype] * 2 * shape.features * (held + kept_tokens * len(compressed))


def whole_groups_start(model_config, group_size: int) -> int:
    """The first layer from which the full-attention layers split into whole groups of ``group_size`` (the
    first ones left dense): layers mod G on a model without sliding layers."""
    full = ModelShape.of(model_config).layer_groups(1)
    return full[len(full) % group_size][0] if len(full) % group_size else 0


def ranks_for_ratio(ratio: float, tokens: int, model_config, *, group_size: int, start_layer: int = 0,
                    residual_length: int = 0, k_share: float = 1 / 3,
                    factor_dtype: str = "bf16", dense_dtype: str = "bf16") -> tuple[int, int]:
    """(rank_k, rank_v) such that the whole cache holds ≈ 1/ratio of a 16-bit dense cache's bytes
    (``kvsvd.accounting.dense16_bytes``) at ``tokens`` tokens per sequence.

    Held, per sequence (entry sizes from ``kvsvd.accounting``): the uncompressed layers (a sliding
    layer its window) and the residual window in ``dense_dtype``, and per group of G full-attention
    layers (T−R)·(r_k + r_v) token-factor entries, (r_k + r_v)·G·F right-factor entries and, for
    int8/int4, 2·(T−R) per-token scales: narrower factors buy proportionally more rank. ``k_share`` of
    the total rank goes to keys: value-heavy splits (rank_k ≈ rank_v / 2) kept needle answers best in
    exact-SVD measurements. A budget that would need more than the full rank min(T−R, G·F) raises
    (compression would hold more than the matrix).
    """
    if ratio <= 1:
        raise ValueError(f"ratio={ratio} is out of range; accepted: > 1")
    choice("dense_dtype", dense_dtype, tuple(STORAGE_DTYPES))
    shape = ModelShape.of(model_config)
    features, G, R = shape.features, group_size, residual_length
    e_u, e_w, e_s = factor_entry_bytes(factor_dtype)
    compressed = [l for g in shape.layer_groups(G, start_layer) if len(g) == G for l in g]
    groups = len(compressed) // G
    n = tokens - R
    budget = dense16_bytes(model_config, tokens) / ratio
    fixed = dense_bytes(model_config, tokens, compressed, R, dense_dtype) + groups * 2 * n * e_s
    total = (budget - fixed) / (groups * (n * e_u + G * features * e_w))
    if total < 2:
        raise ValueError(f"ratio={ratio} leaves no room for factors after the residual window and "
                         "uncompressed layers; accepted: a smaller ratio, residual_length or start_layer")
    rank_k = max(1, round(k_share * total))
    rank_v = max(1, round(total) - rank_k)
    full = min(n, G * features)
    if max(rank_k, rank_v) > full:
        raise ValueError(f"ratio={ratio} with factor_dtype={factor_dtype!r} asks for ranks ({rank_k}, {rank_v}) above "
                         f"the full rank {full} = min(T-R, G*F); accepted: a larger ratio or a wider factor_dtype")
    return rank_k, rank_v
