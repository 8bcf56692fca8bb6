"""Dense caches that store K/V in a chosen dtype and hand them back in the model's dtype.

``Dense16Cache`` is the cache that defines 1×: every K/V entry stored in bf16 (2 bytes) and
upcast on read, whatever dtype the model computes in. On an FP32 model its accuracy next to
``DynamicCache``'s is the cost of 16-bit storage alone. ``StoredLayer`` is also what
``LowRankCache`` keeps its uncompressed layers in.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .accounting import STORAGE_DTYPES, ModelShape

Tensor = torch.Tensor


def with_fresh(read: Tensor, fresh: Tensor, storage: torch.dtype) -> Tensor:
    """``read`` (B, H, T, d), the stored history read back, with its last tokens set to the ``fresh``
    states (B, H, n, d) the model has just computed: a step attends its own new tokens exactly (a
    prefill attends what the model computed), the earlier ones as stored. When ``storage`` is the
    model dtype the stored copy is exact and ``read`` is returned as it is; otherwise ``read`` is a
    copy made by the read-back and is written in place."""
    n = min(fresh.shape[-2], read.shape[-2])
    if storage != fresh.dtype and n:
        read[..., -n:, :] = fresh[..., -n:, :]
    return read


class _Stored:
    """K/V (B, H, T, d) held in ``storage`` dtype: ``keys`` / ``values`` read them back in the model dtype and
    can be assigned (kvpress prunes through them; a sliding layer cuts its window through them)."""

    def _init_storage(self, storage: str) -> None:
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage={storage!r} is unknown; accepted: {', '.join(STORAGE_DTYPES)}")
        self.storage = STORAGE_DTYPES[storage]
        self._keys: Tensor | None = None
        self._values: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device, self.batch = key_states.dtype, key_states.device, key_states.shape[0]
        self.is_initialized = True

    def _read(self, t: Tensor | None) -> Tensor | None:
        return t if t is None or not self.is_initialized else t.to(self.dtype)

    def _store(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(self.storage)

    keys = property(lambda self: self._read(self._keys), lambda self, t: setattr(self, "_keys", self._store(t)))
    values = property(lambda self: self._read(self._values), lambda self, t: setattr(self, "_values", self._store(t)))

    def stored_tensors(self) -> list[Tensor]:
        """The tensors this layer holds (for ``kvsvd.accounting``)."""
        return [t for t in (self._keys, self._values) if t is not None]


class StoredLayer(_Stored, DynamicLayer):
    """A ``DynamicLayer`` whose K/V live in ``storage`` dtype. ``update`` returns the stored history with the
    step's own new tokens as the model computed them."""

    def __init__(self, storage: str = "bf16"):
        self._init_storage(storage)
        super().__init__()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.to(self.storage), value_states.to(self.storage)
        self._keys = k if self._keys is None else torch.cat([self._keys, k], dim=-2)
        self._values = v if self._values is None else torch.cat([self._values, v], dim=-2)
        return with_fresh(self.keys, key_states, self.storage), with_fresh(self.values, value_states, self.storage)

    def reset(self) -> None:
        """Drop the stored tensors (the layer starts over at the next update)."""
        self._keys = self._values = None
        self.is_initialized = False

    def get_seq_length(self) -> int:
        return 0 if self._keys is None or not self._keys.numel() else self._keys.shape[-2]


class StoredSlidingLayer(_Stored, DynamicSlidingWindowLayer):
    """transformers' ``DynamicSlidingWindowLayer`` (the last ``sliding_window − 1`` tokens kept, attention
    over them and the step's own) with its K/V in ``storage`` dtype: a hybrid model's sliding layers in
    ``LowRankCache``."""

    def __init__(self, sliding_window: int, storage: str = "bf16"):
        self._init_storage(storage)
        super().__init__(sliding_window)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        _Stored.lazy_initialization(self, key_states, value_states)
        if hasattr(self, "_sliding_window_tensor"):  # what transformers' own lazy_initialization moves
            self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]


class Dense16Cache(Cache):
    """Every layer a :class:`StoredLayer` in bf16: the 16-bit dense reference cache. Given a hybrid model's
    config, its sliding layers are :class:`StoredSlidingLayer` s (their window, as transformers keeps it)."""

    def __init__(self, model_config=None) -> None:
        shape = None if model_config is None else ModelShape.of(model_config)
        if shape is None or shape.sliding_window is None:
            super().__init__(layer_class_to_replicate=StoredLayer)
        else:
            super().__init__(layers=[StoredSlidingLayer(shape.sliding_window) if kind == "sliding_attention"
                                     else StoredLayer() for kind in shape.layer_types])
