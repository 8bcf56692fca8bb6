"""Byte accounting: every ratio kvsvd prints, stores or plots is bytes held against a 16-bit cache.

The reference is the cache that serving stacks hold and that the field's papers count against
(KIVI, KVQuant, xKV, KVTC, kvpress): **2 bytes per K or V entry, whatever dtype the model
computes in** (FP32 on a CPU, BF16 on a GPU), for the tokens each layer of a dense cache holds (a
sliding-window layer at most its window, as transformers keeps it). What a cache holds is counted tensor by tensor,
each distinct storage once, by kind:

- ``factors``: token and right factors, merged directions and norms, per-prompt bases and means;
- ``scales``: per-token, per-group or per-block scales and zero points of quantised tensors;
- ``codes``: quantised K/V of a quantising peer (QuantizedCache), bit-packed transform coefficients;
- ``residual``: the dense recent window of a compressed layer;
- ``uncompressed``: layers and segments kept dense, MiniCache's retained tokens, a dense cache;
- ``rope``: positions (or cos/sin tables) kept to re-rotate pre-RoPE keys;
- ``calibration``: calibrated bases and means (PCA, the transform coder's calibrated basis), held once
  per model and shared by every sequence;
- ``index``: masks (MiniCache's merged tokens).

``ratio = dense16_bytes / total_bytes``, where ``total_bytes`` is what one sequence holds: a
calibration is held once per model, whatever the number of sequences (KVTC's convention), so it is
reported beside it as ``calibration_bytes``, and ``ratio_all_in = dense16_bytes / (total_bytes +
calibration_bytes)`` charges it all to this one sequence. A dense copy of the cache rebuilt for reading and kept
between steps (``memoize_reads``, TurboQuantCache's dequantised view) is listed as ``rebuilt`` and
reported as ``rebuilt_bytes``, apart from the total: the compressed state does not need it. This
module is the one place where bytes are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
DENSE_ENTRY_BYTES = 2  # the 16-bit reference cache
KINDS = ("factors", "scales", "codes", "residual", "uncompressed", "rope", "calibration", "index")
REBUILT = "rebuilt"  # dense read copies kept between steps, reported apart from the total
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ENTRY_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}  # per stored entry, for budgets
SCALE_BYTES = 2  # int8/int4 token factors: one bf16 scale per token and matrix; their right factor is bf16


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for a storage dtype."""
    return next(name for name, dt in STORAGE_DTYPES.items() if dt == dtype)


def factor_entry_bytes(factor_dtype: str) -> tuple[float, float, float]:
    """(token-factor entry, right-factor entry, per-token scale) bytes of a ``factor_dtype``."""
    if factor_dtype not in ENTRY_BYTES:
        raise ValueError(f"factor_dtype={factor_dtype!r} is unknown; accepted: {', '.join(ENTRY_BYTES)}")
    if factor_dtype in ("int8", "int4"):
        return ENTRY_BYTES[factor_dtype], ENTRY_BYTES["bf16"], SCALE_BYTES
    return ENTRY_BYTES[factor_dtype], ENTRY_BYTES[factor_dtype], 0


@dataclass(frozen=True)
class ModelShape:
    """What a model's KV cache is made of: ``layers`` decoder layers, each holding K and V of ``kv_heads``
    heads × ``head_dim`` per token; ``layer_types`` (transformers' names: ``full_attention``,
    ``sliding_attention``, ...) and the ``sliding_window`` of sliding layers (None without any)."""
    layers: int
    kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int | None = None

    @classmethod
    def of(cls, model_config) -> "ModelShape":
        """The shape of a transformers model config (its text config for a multimodal one)."""
        text = model_config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        types = tuple(getattr(text, "layer_types", None) or ("full_attention",) * text.num_hidden_layers)
        window = getattr(text, "sliding_window", None) if "sliding_attention" in types else None
        return cls(text.num_hidden_layers, text.num_key_value_heads, head_dim, types, window)

    @property
    def features(self) -> int:
        """K (or V) entries per token and layer: kv_heads · head_dim."""
        return self.kv_heads * self.head_dim

    def layer_groups(self, group_size: int, start_layer: int = 0, end_layer: int = -1,
                     sliding: bool = False) -> list[list[int]]:
        """Groups of ``group_size`` consecutive full-attention layers of [start_layer, end_layer] (every layer
        of a model without sliding layers), the last one smaller when the count does not divide; with
        ``sliding``, then the sliding-window layers' groups, formed the same way among themselves."""
        end = self.layers - 1 if end_layer == -1 else end_layer
        groups = []
        for kind in ("full_attention", "sliding_attention") if sliding else ("full_attention",):
            layers = [l for l in range(start_layer, end + 1) if self.layer_types[l] == kind]
            groups += [layers[i:i + group_size] for i in range(0, len(layers), group_size)]
        return groups

    def tokens_held(self, tokens: int) -> list[int]:
        """Tokens each layer of a dense cache holds after ``tokens``: all of them, or on a sliding layer at
        most ``sliding_window − 1`` (transformers' ``DynamicSlidingWindowLayer`` keeps no more)."""
        return [min(tokens, self.sliding_window - 1) if kind == "sliding_attention" else tokens
                for kind in self.layer_types]


def dense16_bytes(model_config, tokens: int, batch: int = 1) -> int:
    """K and V of ``tokens`` tokens per sequence in a 16-bit cache, 2 · B · H · d · 2 bytes per token each
    layer holds (:meth:`ModelShape.tokens_held`): 2 · B · T · L · H · d · 2 without sliding layers."""
    shape = ModelShape.of(model_config)
    return 2 * batch * sum(shape.tokens_held(tokens)) * shape.features * DENSE_ENTRY_BYTES


def storage_key(t: Tensor) -> tuple[int, int]:
    """(data pointer, bytes) of the storage behind ``t``: views of one storage share it."""
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def report(held: dict[str, list[Tensor]], dense16: int) -> dict[str, float]:
    """``{kind}_bytes`` for every kind of :data:`KINDS` (each distinct storage counted once, under the
    first kind that names it), ``total_bytes`` (every kind but ``calibration``: what one sequence holds),
    ``dense16_bytes``, ``ratio`` = dense16 / total, ``ratio_all_in`` = dense16 / (total + calibration)
    and ``rebuilt_bytes`` (the ``rebuilt`` copies, not part of the total)."""
    unknown = set(held) - set(KINDS) - {REBUILT}
    if unknown:
        raise ValueError(f"held tensor kinds {sorted(unknown)} are unknown; accepted: {', '.join(KINDS)}, {REBUILT}")
    seen: set[tuple[int, int]] = set()
    out: dict[str, float] = {}
    for kind in (*KINDS, REBUILT):
        total = 0
        for t in held.get(kind, []):
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                total += key[1]
        out[f"{kind}_bytes"] = total
    out["total_bytes"] = sum(out[f"{kind}_bytes"] for kind in KINDS if kind != "calibration")
    out["dense16_bytes"] = dense16
    all_in = out["total_bytes"] + out["calibration_bytes"]
    out["ratio"] = dense16 / out["total_bytes"] if out["total_bytes"] else float("nan")
    out["ratio_all_in"] = dense16 / all_in if all_in else float("nan")
    return out


def _quantized_parts(q) -> dict[str, list[Tensor]]:
    """A quantised tensor's storage by kind: quanto's tensor subclasses (inner ``_data`` codes,
    ``_scale`` / ``_shift``), or HQQ's ``(codes, meta)`` pair with ``meta['scale']`` / ``meta['zero']``."""
    if isinstance(q, tuple):
        codes, meta = q
        return {"codes": [codes], "scales": [t for k, t in meta.items() if isinstance(t, Tensor)]}
    out: dict[str, list[Tensor]] = {"codes": [], "scales": []}
    stack = [q]
    while stack:
        t = stack.pop()
        if hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                inner = getattr(t, name)
                if "scale" in name or "shift" in name:
                    out["scales"].append(inner)
                else:
                    stack.append(inner)
        else:
            out["codes"].append(t)
    return out


def layer_tensors(layer) -> dict[str, list[Tensor]]:
    """What one transformers cache layer holds: a quantised layer's codes and scales plus its dense
    residual; any other layer's K/V (or its storage, ``stored_tensors()``) as ``uncompressed``."""
    if not layer.is_initialized:
        return {}
    if hasattr(layer, "stored_tensors"):
        return {"uncompressed": layer.stored_tensors()}
    if hasattr(layer, "_key_indices"):  # turboquant's TurboQuantLayer: uint8 indices, fp32 norms, a dense window
        return {"codes": [layer._key_indices, layer._value_indices], "scales": [layer._key_norms, layer._value_norms],
                "residual": [layer._residual_keys, layer._residual_values], REBUILT: [layer.keys, layer.values]}
    dense = [t for t in (layer.keys, layer.values) if t is not None and t.numel()]
    quantized = [q for q in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None))
                 if q is not None]
    if not quantized:
        return {"uncompressed": dense}
    out: dict[str, list[Tensor]] = {"residual": dense, "codes": [], "scales": []}
    for q in quantized:
        for kind, ts in _quantized_parts(q).items():
            out[kind] += ts
    return out


def cache_tensors(cache) -> dict[str, list[Tensor]]:
    """Every tensor a cache holds, by kind: ``cache.held_tensors()`` where the cache lists its own
    (LowRankCache), else the union of :func:`layer_tensors` over its layers."""
    if hasattr(cache, "held_tensors"):
        return cache.held_tensors()
    out: dict[str, list[Tensor]] = {}
    for layer in cache.layers:
        for kind, ts in layer_tensors(layer).items():
            out.setdefault(kind, []).extend(ts)
    return out


def cache_report(cache, model_config, tokens: int, batch: int = 1) -> dict[str, float]:
    """:func:`report` of every tensor ``cache`` holds against a 16-bit cache of ``tokens`` tokens per
    sequence (every token whose K/V entered the cache, also those a press evicted)."""
    return report(cache_tensors(cache), dense16_bytes(model_config, tokens, batch))
