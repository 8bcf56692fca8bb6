"""Attention from the compressed stores (``attn_implementation="kvsvd"``): no K or V is rebuilt where a
store has a latent form.

A store's latent read (``store.latent``, :class:`kvsvd.store.Factors`) gives a layer's keys or values as
x ≈ U·W (+ mean): for low-rank stores U (T × r) is the token factor shared by the G layers of its group
and W (r × H·d) this layer's slice of the right factor; for the transform coder U is the coefficients
Ĉ (T × kept), read from their integer codes with each block's quantiser folded into q·W and the
softmax weights (``kvsvd.store.CodedColumns``), and W the layer's basis rows. For a query q of head h
(KV head h' = h // (Hq/H)):

    scores = (q · W[:, h']ᵀ) · Uᵀ        O(r·d) then O(T·r): U is read once for all heads
    output = (softmax · U_v) · W_v[:, h']  O(T·r_v) then O(r_v·d)

so a decode step reads T·r entries instead of T·H·d dense ones and never rebuilds K or V; the
transform coder unpacks its codes once per step for the G layers of its group. The segments, the dense
residual window and the new tokens are attended part by part, each giving (output, log-sum-exp), and
merged exactly: o = Σᵢ exp(lseᵢ − lse)·oᵢ.

RoPE: scores from a latent form need keys stored *post*-RoPE (``key_space="post_rope"``). With
pre-RoPE keys the rotation depends on each key's position and cannot be folded into W, so
such segments rebuild their keys (and re-rotate them) while values still come from the
latent form. Segments without one (MiniCache merges, dense sinks) are rebuilt densely. Layers
outside the compressed range and prefill steps use SDPA.

The attention function is registered with transformers' ``AttentionInterface`` (and SDPA's
mask function) under ``"kvsvd"`` when ``kvsvd`` is imported; ``LowRankCache.update`` then
returns only the dense residual, tagged with its layer, instead of rebuilding the timeline.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .rope import apply_rope
from .store import Factors

Tensor = torch.Tensor
NAME = "kvsvd"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def kernel_applies(q: Tensor, k, v, mask: Tensor | None) -> bool:
    """The Triton kernel serves decode steps (one query token, no mask) over K and V factors whose token
    factors are tensors (not codes), on CUDA (or anywhere under TRITON_INTERPRET=1, as the tests run it)."""
    return (HAS_TRITON and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and q.shape[3] == 1
            and mask is None and all(isinstance(x, Factors) and isinstance(x.u, Tensor) for x in (k, v)))


def attend_with_kernel(q: Tensor, k: Factors, v: Factors) -> tuple[Tensor, Tensor]:
    """:func:`attend` for one query token through ``triton_attention.lowrank_decode``."""
    from .triton_attention import lowrank_decode
    B, H, g, n, _ = q.shape
    qe = torch.einsum("bhgnd,brhd->bhgnr", q, k.w.expand(B, -1, -1, -1)).reshape(B, H * g, -1)
    ou, lse = lowrank_decode(qe, k.u, v.u)                                               # (B, H·g, r_v), (B, H·g)
    if k.mean is not None:  # a per-head constant score shift moves the lse, not the softmax
        lse = lse + torch.einsum("bhgnd,bhd->bhgn", q, k.mean.expand(B, -1, -1)).reshape(B, H * g)
    o = torch.einsum("bhmr,brhd->bhmd", ou.reshape(B, H, g, -1), v.w.expand(B, -1, -1, -1))
    if v.mean is not None:
        o = o + v.mean[:, :, None]
    return o.unsqueeze(3), lse.reshape(B, H, g, 1)


def attend(q: Tensor, k: Tensor | Factors, v: Tensor | Factors, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax attention of pre-scaled q (B, H, g, n, d) over one part: dense k, v (B, H, T, d) or
    Factors; mask bool (B|1, 1, 1|n, T) or None. Returns (output (B, H, g, n, d), lse (B, H, g, n))."""
    if kernel_applies(q, k, v, mask):
        return attend_with_kernel(q, k, v)
    s = k.scores(q) if isinstance(k, Factors) else q @ k.unsqueeze(2).mT
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)   # a fully masked row stays finite
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = v.combine(p) if isinstance(v, Factors) else p @ v.unsqueeze(2)
    return o / l.clamp_min(torch.finfo(s.dtype).tiny), (m + l.log()).squeeze(-1)


def merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Exact softmax over the union of the parts' keys from their (output, lse) pairs."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    return sum(torch.exp(l - lse).nan_to_num(0.0)[..., None] * o for o, l in parts)


def _segment_operands(layer, seg) -> tuple[Tensor | Factors, Tensor | Factors]:
    """A segment's K and V for layer ``layer.j``: each store's latent read (``store.latent``) where it
    has one (keys only when held post-RoPE), else the layer rebuilt densely (B, H, T, d) float32."""
    cache = layer.group.cache
    H, d = cache.shape.kv_heads, cache.shape.head_dim

    def dense(store, values: bool) -> Tensor:
        x = store.layer(layer.j, torch.float32).unflatten(-1, (H, d)).transpose(1, 2)   # (B, H, T, d)
        if not values and cache.config.key_space == "pre_rope":
            x = apply_rope(x, *layer.group.rope.span(seg.start, seg.start + seg.length))
        return x

    k = seg.keys.latent(layer.j, H) if cache.config.key_space == "post_rope" else None
    v = seg.values.latent(layer.j, H)
    return (k if k is not None else dense(seg.keys, False)), (v if v is not None else dense(seg.values, True))


def low_rank_attention(layer, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       scaling: float) -> Tensor:
    """query (B, Hq, n, d) of the newest n tokens; key/value (B, H, R, d) the layer's dense residual
    (ending with those n tokens); attention_mask bool (B, 1, n, held + R) or None, its first column the group's
    first held position (``held_from``: a sliding group drops what left its window).
    Returns (B, n, Hq, d) in query's dtype."""
    B, Hq, n, d = query.shape
    H, R = key.shape[1], key.shape[2]
    q = query.float().unflatten(1, (H, Hq // H)) * scaling                                # (B, H, g, n, d)
    mask = None if attention_mask is None else attention_mask.bool()[:, :, None]          # (B, 1, 1, n, T)
    parts, first = [], layer.group.held_from
    for seg in layer.group.segments:
        k, v = _segment_operands(layer, seg)
        a = seg.start - first
        parts.append(attend(q, k, v, None if mask is None else mask[..., a:a + seg.length]))
    c = layer.group.compressed_length - first
    if mask is not None:
        res_mask = mask[..., c:c + R]
    elif n > 1:  # causal among the new tokens; everything before them is visible
        res_mask = torch.arange(R, device=q.device)[None] <= (R - n + torch.arange(n, device=q.device))[:, None]
    else:
        res_mask = None
    parts.append(attend(q, key.float(), value.float(), res_mask))
    return merge(parts).flatten(1, 2).transpose(1, 2).to(query.dtype).contiguous()


def kvsvd_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: factors for a LowRankCache layer with compressed
    segments, SDPA for everything else (prefill, uncompressed layers, other caches)."""
    layer = getattr(key, "kvsvd_layer", None)
    if layer is None or not layer.group.segments:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"dropout={dropout} is not supported by the kvsvd attention; accepted: 0 (inference)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return low_rank_attention(layer, query, key, value, attention_mask, scale), None


AttentionInterface.register(NAME, kvsvd_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
