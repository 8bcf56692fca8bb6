"""The one place where kvsvd meets the parts of transformers' cache API that changed between 5.2
and the current release. Nothing else in kvsvd looks at transformers' version; every difference
is recognised by what the installed transformers offers or passes.

- The cache argument of ``forward``/``generate``: ``past_key_values`` (5.2), ``cache`` later (the
  old name is still accepted there, with a FutureWarning). :data:`CACHE_ARG` names the one the
  installed transformers declares; :func:`with_cache` builds the keyword.
- What a cache layer's ``update`` receives: ``cache_kwargs={"cos", "sin", "cache_position"}``
  (5.2), or ``kwargs={..., "position_ids"}`` and no cos/sin (later). :func:`rope_of_update`
  returns the cos/sin the model applied to the keys either way: passed, or computed from the
  positions with the model's own RoPE parameters, rounded to the key dtype as the model rounds them
  (:func:`rope_at`, which also rebuilds a pre-RoPE cache's rotation from positions on read).
- ``crop(n)``: a positive n was the length to keep (5.2) and is refused later; a negative n removes
  that many tokens on both. :func:`crop_to` keeps the first tokens.
- ``get_mask_sizes`` receives ``cache_position`` (a tensor, 5.2) or ``query_length`` (an int);
  the maximum length is ``get_max_cache_shape`` (5.2) or ``get_max_length``:
  :class:`GrowingLayer` answers both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .accounting import ModelShape

Tensor = torch.Tensor

CACHE_ARG = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def with_cache(cache) -> dict[str, Any]:
    """``{CACHE_ARG: cache}``: ``model(ids, **with_cache(cache))``, ``model.generate(..., **with_cache(cache))``."""
    return {CACHE_ARG: cache}


def cache_of(kwargs: dict[str, Any]):
    """The cache among the keyword arguments of a forward (a forward hook's ``kwargs``), or None."""
    return kwargs.get(CACHE_ARG, kwargs.get("past_key_values"))


def update_extras(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One dict of what a layer's ``update(key, value, *args, **kwargs)`` was given besides the
    states: 5.2's positional ``cache_kwargs`` dict, later releases' ``kwargs=`` dict, or keywords."""
    extras: dict[str, Any] = {}
    for a in args:
        if isinstance(a, dict):
            extras.update(a)
    extras.update(kwargs.pop("kwargs", None) or {})
    extras.update(kwargs)
    return extras


def crop_to(cache, length: int) -> None:
    """Keep the first ``length`` tokens of every layer of a transformers ``cache``."""
    excess = cache.get_seq_length() - length
    if excess < 0:
        raise ValueError(f"length={length} exceeds the {cache.get_seq_length()} tokens held; accepted: "
                         f"[0, {cache.get_seq_length()}]")
    if excess:
        cache.crop(-excess)


def query_length(cache_position_or_length: Tensor | int) -> int:
    """The number of new tokens from ``get_mask_sizes``'s argument: 5.2's ``cache_position`` (n,)
    or the int query length of later releases."""
    if isinstance(cache_position_or_length, int):
        return cache_position_or_length
    return cache_position_or_length.shape[0]


def _inverse_frequencies(text_config, layer_type: str = "full_attention") -> tuple[Tensor, float]:
    """(inv_freq (d/2,) float32, attention_scaling) of the model's RoPE on ``layer_type`` layers, as its rotary
    module computes them (a hybrid model such as Gemma 3 keeps RoPE parameters per layer type)."""
    params = getattr(text_config, "rope_parameters", None) or {}
    per_type = isinstance(params.get(layer_type), dict)
    params = params[layer_type] if per_type else params
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        d = ModelShape.of(text_config).head_dim
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type={rope_type!r}: this transformers does not pass cos/sin to the cache, and "
                         "kvsvd rebuilds them only for position-independent RoPE parameters; accepted: "
                         f"default, {', '.join(k for k in ROPE_INIT_FUNCTIONS if k != 'dynamic')}, or "
                         "key_space='post_rope'")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config, **({"layer_type": layer_type} if per_type else {}))
    return inv_freq.float(), scaling


def positions_of_update(extras: dict[str, Any]) -> Tensor | None:
    """The RoPE positions of this ``update``'s tokens, (B, T) or (1, T): ``position_ids`` where the call
    carries them, else 5.2's ``cache_position`` (the positions a model uses when none are given)."""
    if extras.get("position_ids") is not None:
        return extras["position_ids"]
    cache_position = extras.get("cache_position")
    return None if cache_position is None else cache_position[None]


def rope_at(positions: Tensor, text_config, dtype: torch.dtype,
            layer_type: str = "full_attention") -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, d) in ``dtype`` of the model's RoPE on ``layer_type`` layers at ``positions`` (B, T),
    computed as its rotary module computes them (bit for bit, tests/test_compat.py)."""
    inv_freq, scaling = _inverse_frequencies(text_config, layer_type)
    freqs = positions[..., None].float() * inv_freq.to(positions.device)      # (B, T, d/2)
    # the rotary module takes cos/sin of cat(freqs, freqs): the same values as cat of the halves', at half the work
    return tuple(torch.cat((t, t), dim=-1).to(dtype) for t in (freqs.cos() * scaling, freqs.sin() * scaling))


def rope_of_update(extras: dict[str, Any], text_config, dtype: torch.dtype,
                   layer_type: str = "full_attention") -> tuple[Tensor, Tensor] | None:
    """cos, sin (B, T, d) in ``dtype`` that the model applied to the keys of this ``update`` (a
    ``layer_type`` layer's), or None when the call carries neither cos/sin nor position_ids."""
    if "cos" in extras and "sin" in extras:
        return extras["cos"], extras["sin"]
    positions = extras.get("position_ids")
    return None if positions is None else rope_at(positions, text_config, dtype, layer_type)


class GrowingLayer(CacheLayerMixin):
    """A cache layer without a maximum length whose mask covers everything it holds plus the new
    tokens; subclasses give ``get_seq_length``."""

    def get_mask_sizes(self, cache_position_or_length: Tensor | int) -> tuple[int, int]:
        return self.get_seq_length() + query_length(cache_position_or_length), 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length
