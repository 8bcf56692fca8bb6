"""LowRankCache: a transformers Cache that really stores low-rank (or merged) K/V.

Layout, as in transformers' cache_utils: a list of per-layer objects with one ``update``
contract. Layers outside [start_layer, end_layer] are dense (``kvsvd.dense.StoredLayer``). Compressed
layers belong to a :class:`LayerGroup` (G consecutive layers of one type; G=1 for per-layer methods) that
owns the compressed *segments* of the token timeline; each layer keeps its own dense
*residual* (the newest tokens, post-RoPE, exactly as the model produced them).

On a hybrid model the groups form over the full-attention layers; the sliding-window layers stay dense and
capped at their window as transformers keeps them, unless the method codes them (``Method.codes_windows``:
``transform``): they then form groups of their own, which drop every segment whose tokens have all left the
window (a segment straddling its edge stays, and the model's sliding mask, built from ``get_mask_sizes``, hides
its older tokens). Each layer type has its own RoPE table (Gemma 3 rotates local and global layers with
different bases).

Timeline of one group:
- the first forward (prefill) stores K/V densely and attends with them uncompressed;
- the prefill is compressed when the next forward reaches the group (or on
  ``cache.compress_pending()``), after a kvpress press may have pruned it, keeping the last
  ``residual_length`` tokens dense; the dense prefill is then freed;
- later tokens (question, decode) append to the residual; whenever it holds more than
  residual_length + block_size tokens, the oldest block_size become a new segment.

Each method compresses through its ``kvsvd.methods`` entry (``Method.code``). ``transform`` codes every
group's prefill in one call (``Transform.code``): one bit allocation spends the whole cache's byte budget
over all groups, K and V; the first ``sink_tokens`` of the timeline stay dense as a segment of their own.

Everything kept dense (the residual window, uncompressed layers) is stored in
``config.dense_dtype`` (bf16 by default, what a 16-bit serving cache holds) and read back in the
model dtype. Reads rebuild the segments densely (the reconstruct-on-read path). For ``pre_rope``
keys the cache inverts RoPE with the model's own cos/sin (passed to ``update``, or rebuilt from its
``position_ids`` by ``kvsvd.compat``) on the way in and re-applies it on read, rebuilt from the
tokens' positions (:class:`RopeTable`: no bytes for contiguous positions, int32 positions otherwise,
the model's cos/sin tables only where its RoPE parameters do not give them back), counted as ``rope``.
With ``memoize_reads`` a group keeps what it rebuilt until its segments change: the same
tensors, computed once instead of at every step (an evaluation device for accuracy grids,
where decode would otherwise rebuild an unchanging prefix per token); those dense copies are
reported as ``rebuilt_bytes``, apart from the compressed state's ``total_bytes``.

``layer.keys`` / ``layer.values`` are the whole timeline (segments rebuilt + residual) and
can be assigned, so kvpress presses and its pipeline use this cache unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from . import accounting, compat
from .accounting import STORAGE_DTYPES
from .config import CompressionConfig
from .methods.base import Ranks
from .dense import StoredLayer, StoredSlidingLayer, with_fresh
from .rope import apply_rope, invert_rope

Tensor = torch.Tensor


@dataclass
class Segment:
    """Compressed tokens [start, start+length) of a group's timeline: one store for K, one for V."""
    start: int
    length: int
    keys: Any
    values: Any


@dataclass
class RopeRun:
    """``n`` consecutive tokens of the timeline and what rebuilds the cos/sin the model rotated their keys
    with (in ``dtype``): nothing held for positions ``first``, ``first`` + 1, … (the same in every sequence);
    else their ``positions`` (B, n) int32; else, where the model's RoPE parameters do not give its cos/sin
    back, its ``cos``/``sin`` themselves (B, n, d) float32, at half width (``half``) when both halves repeat."""
    n: int
    dtype: torch.dtype
    device: torch.device
    first: int = 0
    positions: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    half: bool = False

    @property
    def contiguous(self) -> bool:
        return self.positions is None and self.cos is None

    def angles(self, a: int, b: int, text_config, layer_type: str) -> tuple[Tensor, Tensor]:
        """cos, sin (B or 1, b − a, d) float32 of this run's tokens [a, b)."""
        if self.cos is not None:
            return tuple(torch.cat([t, t], -1) if self.half else t for t in (self.cos[:, a:b], self.sin[:, a:b]))
        positions = (self.positions[:, a:b] if self.positions is not None
                     else torch.arange(self.first + a, self.first + b, device=self.device)[None])
        return tuple(t.float() for t in compat.rope_at(positions, text_config, self.dtype, layer_type))

    def cut(self, n: int) -> "RopeRun":
        """The first n tokens (copies: the longer tensors are freed)."""
        keep = lambda t: None if t is None else t[:, :n].clone()  # noqa: E731
        return RopeRun(n, self.dtype, self.device, self.first, keep(self.positions), keep(self.cos), keep(self.sin),
                       self.half)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.positions, self.cos, self.sin) if t is not None]


@dataclass
class RopeTable:
    """The RoPE rotation of every token of the timeline (pre-RoPE keys are re-rotated on read), held as
    :class:`RopeRun` s: nothing for contiguous positions, at most 4 bytes per token otherwise, the
    model's cos/sin tables only where its positions and RoPE parameters do not rebuild them bit for bit."""
    text_config: Any
    layer_type: str = "full_attention"  # whose RoPE parameters rotated the keys (a hybrid model has two)
    runs: list[RopeRun] = field(default_factory=list)
    length: int = 0

    def append(self, cos: Tensor, sin: Tensor, positions: Tensor | None) -> None:
        """The cos/sin (B, n, d) the model applied to n new keys, and their positions ((B, n), (1, n) or None)."""
        B, n, d = cos.shape
        run = RopeRun(n, cos.dtype, cos.device)
        try:
            exact = positions is not None and all(
                torch.equal(t.expand_as(ref), ref) for t, ref in zip(compat.rope_at(
                    positions, self.text_config, cos.dtype, self.layer_type), (cos, sin)))
        except ValueError:  # position-dependent RoPE parameters (kvsvd.compat): keep the tables
            exact = False
        if exact:
            positions = positions.expand(B, n)
            steps = positions[:1, :1] + torch.arange(n, device=positions.device)
            if torch.equal(positions, steps.expand(B, n)):
                run.first = int(positions[0, 0])
            else:
                run.positions = positions.to(torch.int32, copy=True)
        else:
            h = d // 2
            run.half = torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])
            if run.half:
                cos, sin = cos[..., :h], sin[..., :h]
            run.cos, run.sin = cos.to(torch.float32, copy=True), sin.to(torch.float32, copy=True)
        last = self.runs[-1] if self.runs else None
        if (last is not None and run.contiguous and last.contiguous and last.first + last.n == run.first
                and (last.dtype, last.device) == (run.dtype, run.device)):
            last.n += n  # a decode step continues the run: nothing grows
        else:
            self.runs.append(run)
        self.length += n

    def span(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """cos, sin (B or 1, stop − start, d) float32."""
        parts, offset = [], 0
        for run in self.runs:
            a, b = max(start - offset, 0), min(stop - offset, run.n)
            if a < b:
                parts.append(run.angles(a, b, self.text_config, self.layer_type))
            offset += run.n
        if not parts:
            d = accounting.ModelShape.of(self.text_config).head_dim
            return torch.zeros(1, 0, d), torch.zeros(1, 0, d)
        B = max(c.shape[0] for c, _ in parts)
        return tuple(torch.cat([p[i].expand(B, -1, -1) for p in parts], dim=-2) for i in (0, 1))

    def tensors(self) -> list[Tensor]:
        return [t for run in self.runs for t in run.tensors()]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens."""
        runs, offset = [], 0
        for run in self.runs:
            if offset < length:
                runs.append(run if offset + run.n <= length else run.cut(length - offset))
            offset += run.n
        self.runs, self.length = runs, min(self.length, length)


class LayerGroup:
    """G compressed layers of one type sharing a token timeline and its segments. Positions on the timeline are
    absolute: a sliding-window group drops the segments that left its window (:meth:`leave_window`), so that
    its segments start at ``held_from``, not at 0."""

    def __init__(self, cache: "LowRankCache", layers: list[int]):
        self.cache, self.layers = cache, layers
        self.layer_type = cache.shape.layer_types[layers[0]]
        self.window = cache.shape.sliding_window if self.layer_type == "sliding_attention" else None
        self.members: list[LowRankLayer] = []
        self.segments: list[Segment] = []
        self.retained: list[Segment] = []  # what dropped segments leave held for later ones (a shared basis)
        self.compressed_length = 0      # the timeline's tokens before the dense residual (coded or dropped)
        self.prefill_pending = False    # the first forward's tokens wait for compression
        self.rebuilt: dict[tuple[int, bool, torch.dtype], tuple[int, Tensor]] = {}  # memoize_reads: n_segments, read

    @property
    def rope(self) -> RopeTable:
        """The RoPE rotation of this group's layer type."""
        return self.cache.ropes[self.layer_type]

    @property
    def held_from(self) -> int:
        """The timeline position of the first token held."""
        return self.segments[0].start if self.segments else self.compressed_length

    def window_start(self, end: int) -> int:
        """The first position held once a sliding group has dropped what a query after ``end`` tokens cannot
        see (positions before end − window + 1): whole segments, and the residual's oldest tokens when no
        segment is left; a segment that straddles the window's edge stays (the model's mask hides its older
        tokens). A full-attention group drops nothing."""
        if self.window is None:
            return self.held_from
        oldest = end - self.window + 1
        seg = next((seg for seg in self.segments if seg.start + seg.length > oldest), None)
        return seg.start if seg is not None else max(self.compressed_length, oldest)

    def leave_window(self) -> None:
        """Drop what :meth:`window_start` says no later query sees. A dropped store whose parts later stores share
        leaves them held (``Method.kept_when_dropped``), in :attr:`retained`, while the window can still code a
        new block (``residual_length + block_size`` below it; otherwise the residual never reaches a block)."""
        if self.window is None or not self.members[0].is_initialized:
            return
        first = self.window_start(self.members[0].get_seq_length())
        gone = [seg for seg in self.segments if seg.start + seg.length <= first]
        cfg = self.cache.config
        codes_blocks = cfg.residual_length + cfg.block_size < self.window
        for seg in gone:
            kept = [self.cache.method.kept_when_dropped(store) if codes_blocks else None
                    for store in (seg.keys, seg.values)]
            if None not in kept:
                self.retained.append(Segment(seg.start, 0, *kept))
        if gone:
            self.segments = self.segments[len(gone):]
            self.rebuilt.clear()
        if first > self.compressed_length:  # no segment left: the residual's oldest tokens go
            for m in self.members:
                m.pop_oldest(first - self.compressed_length)
            self.compressed_length = first

    def compress_pending(self) -> None:
        """Compress the stored prefill (all but the last residual_length tokens); a joint method
        (``transform``) codes every group's prefill at once (one allocation)."""
        if not self.prefill_pending:
            return
        if self.cache.method.joint:
            self.cache.compress_pending()
            return
        self.prefill_pending = False
        n = self.pending_tokens()
        if n > 0:
            self.cache.method.code(self.cache, [(self, n)], whole_cache=True)

    def pending_tokens(self) -> int:
        """Prefill tokens beyond the residual window (the same in every member)."""
        lengths = {m.residual_length() for m in self.members}
        if len(lengths) != 1:
            raise ValueError(f"layers {self.layers} hold {sorted(lengths)} tokens after prefill (a press evicted "
                             "different tokens per layer): layer_group_size must be 1 to compress them")
        return lengths.pop() - self.cache.config.residual_length

    def maybe_compress_block(self) -> None:
        cfg = self.cache.config
        while self.members[0].residual_length() > cfg.residual_length + cfg.block_size:
            self.cache.method.code(self.cache, [(self, cfg.block_size)], whole_cache=False)

    def take_oldest(self, n: int) -> tuple[Tensor, Tensor]:
        """Remove the n oldest residual tokens of every member: K (un-rotated for pre_rope) and V as
        (B, n, G, H·d) in the model dtype; the caller adds them back as the next segment."""
        cfg = self.cache.config
        start = self.compressed_length
        if cfg.key_space == "pre_rope":
            if self.rope.length < start + n or any(m.evicted for m in self.members):
                raise ValueError("key_space='pre_rope' needs the cos/sin of every stored token, but tokens "
                                 "were evicted (a kvpress press?): use key_space='post_rope'")
            rotation = self.rope.span(start, start + n)  # the same for every member
        ks, vs = [], []
        for m in self.members:
            k, v = (t.to(m.dtype) for t in m.pop_oldest(n))   # (B, H, n, d) post-RoPE, (B, H, n, d)
            if cfg.key_space == "pre_rope":
                k = invert_rope(k, *rotation)
            ks.append(k.transpose(1, 2).flatten(2))      # (B, n, H·d)
            vs.append(v.transpose(1, 2).flatten(2))
        return torch.stack(ks, 2), torch.stack(vs, 2)

    def add_segment(self, n: int, keys, values) -> None:
        """Append the stores of the next n tokens of the timeline."""
        self.segments.append(Segment(self.compressed_length, n, keys, values))
        self.compressed_length += n

    def read(self, j: int, values: bool, dtype: torch.dtype) -> Tensor | None:
        """Layer j's compressed tokens rebuilt densely: (B, H, T_compressed, d), or None. With
        memoize_reads a stale read rebuilds every layer of the group at once (each store is then read
        layer after layer, as a forward reads it)."""
        if not self.segments:
            return None
        key = (j, values, dtype)
        if not self.cache.memoize_reads:
            return self._rebuild(j, values, dtype)
        if key not in self.rebuilt or self.rebuilt[key][0] != len(self.segments):
            for jj in range(len(self.members)):
                self.rebuilt[jj, values, dtype] = (len(self.segments), self._rebuild(jj, values, dtype))
        return self.rebuilt[key][1]

    def _rebuild(self, j: int, values: bool, dtype: torch.dtype) -> Tensor:
        return torch.cat([self._decode(seg, j, values, dtype) for seg in self.segments], dim=-2)

    def _decode(self, seg: Segment, j: int, values: bool, dtype: torch.dtype) -> Tensor:
        """Layer j's K (post-RoPE) or V of one segment: (B, H, seg.length, d)."""
        cache = self.cache
        x = (seg.values if values else seg.keys).layer(j, dtype)            # (B, T, H·d)
        x = x.unflatten(-1, (cache.shape.kv_heads, cache.shape.head_dim)).transpose(1, 2)
        if not values and cache.config.key_space == "pre_rope":
            x = apply_rope(x, *self.rope.span(seg.start, seg.start + seg.length))
        return x

    def check_crop(self, keep: int) -> None:
        """Refuse a cut at ``keep`` tokens whose window reaches positions a sliding group has dropped."""
        if self.window is not None and self.held_from > max(0, keep - self.window + 1):
            raise ValueError(f"max_length={keep} needs positions from {max(0, keep - self.window + 1)} in the "
                             f"sliding layers {self.layers}, which hold positions from {self.held_from} only (the "
                             f"rest left their window); accepted: >= {self.held_from + self.window - 1}")

    def crop(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the group's timeline: segments from ``keep`` on are dropped,
        a segment that straddles it is decoded into every member's dense residual (its tokens before
        ``keep``), and every residual is cut at ``keep``. The RoPE table is the cache's to cut."""
        if keep < self.compressed_length:
            straddle = next(seg for seg in self.segments if seg.start <= keep < seg.start + seg.length)
            for j, m in enumerate(self.members):
                k, v = (self._decode(straddle, j, values, m.dtype)[..., :keep - straddle.start, :].to(m.storage)
                        for values in (False, True))
                m._res_k, m._res_v = k, v
            self.segments = [seg for seg in self.segments if seg.start + seg.length <= straddle.start]
            self.compressed_length = straddle.start
            self.rebuilt.clear()  # memoized reads are keyed by segment count, which a later block reuses
        for m in self.members:
            if m.residual_length() > keep - self.compressed_length:
                n = keep - self.compressed_length
                m._res_k, m._res_v = m._res_k[..., :n, :].clone(), m._res_v[..., :n, :].clone()


class LowRankLayer(compat.GrowingLayer):
    """One compressed layer: a view on its group's segments plus its own dense residual."""

    def __init__(self, group: LayerGroup, j: int):
        self.group, self.j = group, j
        self.storage = STORAGE_DTYPES[group.cache.config.dense_dtype]
        self._res_k: Tensor | None = None
        self._res_v: Tensor | None = None
        self.evicted = False
        super().__init__()

    @property
    def is_sliding(self) -> bool:
        """A sliding-window layer (transformers builds its mask from the first such layer's ``get_mask_sizes``)."""
        return self.group.window is not None

    # -- the transformers layer contract ------------------------------------------------
    def get_mask_sizes(self, cache_position_or_length: Tensor | int) -> tuple[int, int]:
        """(tokens the step attends: those held once the group has left its window, plus the new ones; the
        position of the first): what transformers' mask functions take as (kv_length, kv_offset)."""
        end = self.get_seq_length()
        first = self.group.window_start(end)
        return end - first + compat.query_length(cache_position_or_length), first

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device, self.batch = key_states.dtype, key_states.device, key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the step's K/V (B, H, n, d); returns the whole timeline (or, for the kvsvd attention,
        the dense residual). ``args``/``kwargs``: what the model passes (``kvsvd.compat.update_extras``)."""
        group, cache = self.group, self.group.cache
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            group.prefill_pending = True
        elif self.j == 0:
            group.leave_window()
            group.compress_pending()
        if self.j == 0 and group is cache.rope_keepers[group.layer_type] and cache.config.key_space == "pre_rope":
            extras = compat.update_extras(args, kwargs)
            rope = compat.rope_of_update(extras, cache.text_config, key_states.dtype, group.layer_type)
            if rope is None:
                raise ValueError("key_space='pre_rope' needs the model to pass cos/sin or position_ids to "
                                 "cache.update (RoPE models do); use key_space='post_rope'")
            group.rope.append(*rope, compat.positions_of_update(extras))
        self._append(key_states, value_states)
        if self.j == len(group.members) - 1 and not group.prefill_pending:
            group.maybe_compress_block()
        # the step attends its own new tokens as the model computed them, the earlier ones as stored
        if cache.decodes_from_factors:  # the kvsvd attention reads the segments' factors itself
            return (self._tagged(with_fresh(self._res_k.to(self.dtype), key_states, self.storage)),
                    self._tagged(with_fresh(self._res_v.to(self.dtype), value_states, self.storage)))
        return with_fresh(self.keys, key_states, self.storage), with_fresh(self.values, value_states, self.storage)

    def _tagged(self, t: Tensor) -> Tensor:
        """A view of the dense residual that names this layer to ``kvsvd.attention``."""
        view = t.view_as(t)
        view.kvsvd_layer = self
        return view

    def get_seq_length(self) -> int:
        return self.group.compressed_length + self.residual_length() if self.is_initialized else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("LowRankCache does not support beam search (reorder_cache): use num_beams=1")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a LowRankCache layer shares its segments with its group: crop the cache "
                                  "(LowRankCache.crop), or assign the layer's keys and values")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("LowRankCache does not support batch_repeat_interleave (num_beams / "
                                  "num_return_sequences > 1): expand the inputs before prefill instead")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("LowRankCache does not support batch_select_indices")

    def reset(self) -> None:
        raise NotImplementedError("LowRankCache cannot be reset in place: create a new LowRankCache")

    # -- the whole timeline, readable and assignable (kvpress) ------------------------------
    def _timeline(self, values: bool) -> Tensor | None:
        res = self._res_v if values else self._res_k
        if not self.is_initialized or res is None:
            return res
        res = res.to(self.dtype)
        old = self.group.read(self.j, values, self.dtype)
        return res if old is None else torch.cat([old, res], dim=-2)

    def _assign(self, value: Tensor | None, values: bool) -> None:
        group = self.group
        if value is not None and not group.prefill_pending and value.shape[-2] < self.get_seq_length() - group.held_from:
            # kvpress drops a question and its answer: the whole cache is cut there (codes, residuals and the
            # RoPE table; kvpress then assigns every layer its cut timeline in turn)
            group.cache.crop(group.held_from + value.shape[-2])
        if value is not None and group.compressed_length:
            value = value[..., group.compressed_length - group.held_from:, :]
        if value is not None:  # a copy in the storage dtype: the rebuilt timeline is freed
            value = value.to(self.storage, copy=True)
        old = self._res_v if values else self._res_k
        if value is not None and old is not None and value.shape[-2] < old.shape[-2] and self.group.prefill_pending:
            self.evicted = True  # a press pruned the prefill: positions no longer match the RoPE table
        if values:
            self._res_v = value
        else:
            self._res_k = value

    keys = property(lambda self: self._timeline(False), lambda self, v: self._assign(v, False))
    values = property(lambda self: self._timeline(True), lambda self, v: self._assign(v, True))

    # -- residual bookkeeping --------------------------------------------------------------
    def residual_length(self) -> int:
        return 0 if self._res_k is None else self._res_k.shape[-2]

    def _append(self, k: Tensor, v: Tensor) -> None:
        k, v = k.to(self.storage, copy=True), v.to(self.storage, copy=True)
        self._res_k = k if self._res_k is None else torch.cat([self._res_k, k], dim=-2)
        self._res_v = v if self._res_v is None else torch.cat([self._res_v, v], dim=-2)

    def pop_oldest(self, n: int) -> tuple[Tensor, Tensor]:
        """Remove and return the n oldest residual tokens (storage dtype); the rest is copied so the old
        buffer is freed."""
        k, v = self._res_k[..., :n, :], self._res_v[..., :n, :]
        self._res_k, self._res_v = self._res_k[..., n:, :].clone(), self._res_v[..., n:, :].clone()
        return k, v


class LowRankCache(Cache):
    """A ``transformers`` Cache holding compressed K/V; pass it as the model's cache (``cache=`` on
    current transformers, ``past_key_values=`` on 5.2; ``kvsvd.compat.with_cache`` builds either).

    >>> cache = LowRankCache(CompressionConfig(method="xkv", rank_k=128, rank_v=192, layer_group_size=2),
    ...                      model.config)
    >>> model.generate(**inputs, **with_cache(cache), max_new_tokens=20)
    >>> cache.memory_report()
    """

    def __init__(self, config: CompressionConfig, model_config, *, memoize_reads: bool = False) -> None:
        text = model_config.get_text_config(decoder=True)
        self.config = config
        self.method = config.spec
        self.model_config = model_config
        self.text_config = text
        self.memoize_reads = memoize_reads
        self.shape = shape = accounting.ModelShape.of(model_config)
        other = sorted(set(shape.layer_types) - {"full_attention", "sliding_attention"})
        if other:
            raise ValueError(f"the model has {', '.join(other)} layers (config.layer_types); LowRankCache holds "
                             "full-attention layers (compressed) and sliding-window layers (dense, capped at the "
                             "window); accepted: models whose layers are full_attention or sliding_attention")
        end = shape.layers - 1 if config.end_layer == -1 else config.end_layer
        if end >= shape.layers:
            raise ValueError(f"end_layer={config.end_layer} is out of range; accepted: [0, {shape.layers - 1}] or -1")
        if config.start_layer > end:
            raise ValueError(f"start_layer={config.start_layer} > end_layer={end}")
        G = config.layer_group_size
        # over the full-attention layers of the range, and the sliding ones where the method codes them
        groups = shape.layer_groups(G, config.start_layer, end, sliding=self.method.codes_windows)
        left = [l for l, kind in enumerate(shape.layer_types) if kind == "sliding_attention"
                and not config.start_layer <= l <= end]
        if self.method.codes_windows and left:
            raise ValueError(f"method={config.method!r} codes the sliding-window layers, and transformers masks them "
                             f"all alike: start_layer={config.start_layer}, end_layer={config.end_layer} leave "
                             f"sliding layers {left} out; accepted: a range holding every sliding layer")
        n = sum(map(len, groups))
        if not n:
            raise ValueError(f"start_layer={config.start_layer}, end_layer={config.end_layer} hold no full-attention "
                             "layer to compress; accepted: a range with at least one")
        if n % G and not self.method.joint:  # rank budgets are per group of G layers
            raise ValueError(f"layer_group_size={G} does not divide the {n} full-attention layers of "
                             f"[{config.start_layer}, {end}]; accepted: a divisor of {n}, or change start/end_layer "
                             "(method='transform' codes the remainder as a smaller group)")
        features = G * shape.features
        if isinstance(config.params, Ranks):
            for name in ("rank_k", "rank_v"):
                if getattr(config.params, name) > features:
                    raise ValueError(f"{name}={getattr(config.params, name)} exceeds the {features} features of a "
                                     f"group ({G} layers × {shape.kv_heads} heads × {shape.head_dim}); accepted: "
                                     f"[1, {features}]")
        self.calibration = self.method.prepare(self, groups)  # what the method holds once per model, or None
        self.compression_log: list[dict] = []
        self.groups: list[LayerGroup] = []
        self.ropes: dict[str, RopeTable] = {}  # by layer type (a hybrid model rotates with two sets of parameters)
        self.rope_keepers: dict[str, LayerGroup] = {}  # the group whose first layer appends each table
        members: dict[int, LowRankLayer] = {}
        for layer_ids in groups:  # the last of each type may be smaller
            group = LayerGroup(self, layer_ids)
            group.members = [LowRankLayer(group, j) for j in range(len(group.layers))]
            self.groups.append(group)
            self.ropes.setdefault(group.layer_type, RopeTable(text, group.layer_type))
            self.rope_keepers.setdefault(group.layer_type, group)
            members.update(zip(layer_ids, group.members))
        # the rest dense in dense_dtype: a sliding layer as transformers keeps it (its window), a full one whole
        super().__init__(layers=[members.get(l) or (
            StoredSlidingLayer(shape.sliding_window, config.dense_dtype) if kind == "sliding_attention"
            else StoredLayer(config.dense_dtype)) for l, kind in enumerate(shape.layer_types)])

    def __deepcopy__(self, memo: dict) -> "LowRankCache":
        """An independent copy of the cached K/V state; the model config is shared, not copied."""
        memo[id(self.model_config)] = self.model_config
        new = memo[id(self)] = self.__class__.__new__(self.__class__)
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    @property
    def decodes_from_factors(self) -> bool:
        """True when the model attends with ``attn_implementation="kvsvd"`` (kvsvd.attention):
        update() then returns the dense residual only, never a rebuilt timeline."""
        return getattr(self.model_config, "_attn_implementation", None) == "kvsvd"

    def compress_pending(self) -> None:
        """Compress every group's stored prefill now (otherwise the next forward does it), after every sliding
        group has dropped what left its window."""
        for group in self.groups:
            group.leave_window()
        if not self.method.joint:
            for group in self.groups:
                group.compress_pending()
            return
        jobs = []
        for group in self.groups:
            if group.prefill_pending:
                group.prefill_pending = False
                jobs.append((group, group.pending_tokens()))
        self.method.code(self, [(g, n) for g, n in jobs if n > 0], whole_cache=True)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("LowRankCache does not support beam search (reorder_cache): use num_beams=1")

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens of the timeline (negative: drop the last −max_length), as
        ``DynamicCache.crop``: coded segments after the cut are dropped, one that straddles it is decoded
        into the dense residuals, and the RoPE table is cut; ``memory_report`` then counts what is left."""
        n = self.get_seq_length()
        keep = n + max_length if max_length < 0 else max_length
        if keep < 0:
            raise ValueError(f"max_length={max_length} is out of range; accepted: [-{n}, ∞)")
        if keep >= n:
            return
        for group in self.groups:  # every refusal before any cut
            group.check_crop(keep)
        for group in self.groups:
            group.crop(keep)
        for layer in self.layers:
            if not isinstance(layer, LowRankLayer) and layer.get_seq_length() > keep:
                layer.crop(keep - layer.get_seq_length())  # a negative count: every supported release takes it
        for rope in self.ropes.values():
            rope.crop(keep)

    def held_tensors(self) -> dict[str, list[Tensor]]:
        """Every tensor the cache holds, by kind of ``kvsvd.accounting.KINDS`` (see memory_report)."""
        out: dict[str, list[Tensor]] = {k: [] for k in (*accounting.KINDS, accounting.REBUILT)}
        for layer in self.layers:
            if isinstance(layer, LowRankLayer):
                out["residual"] += [t for t in (layer._res_k, layer._res_v) if t is not None]
            else:
                for kind, ts in accounting.layer_tensors(layer).items():
                    out[kind] += ts
        for group in self.groups:
            for seg in group.retained + group.segments:
                for store in (seg.keys, seg.values):
                    for kind, ts in store.held().items():
                        out[kind] += ts
        out["rope"] += [t for rope in self.ropes.values() for t in rope.tensors()]
        out["calibration"] += self.method.held_once(self.calibration)
        out[accounting.REBUILT] = [t for g in self.groups for _, t in g.rebuilt.values()]
        return out

    def path_counts(self) -> dict[str, int]:
        """How many K or V matrices each path holds: every segment's two stores by their ``path``
        (``randomized q2 p8 bf16``, ``gram int8``, ...) and two per uncompressed layer (``dense bf16``)."""
        counts: dict[str, int] = {}
        dense = f"dense {self.config.dense_dtype}"
        for layer in self.layers:
            if not isinstance(layer, LowRankLayer) and layer.is_initialized:
                counts[dense] = counts.get(dense, 0) + 2
        for group in self.groups:
            for seg in group.segments:
                for store in (seg.keys, seg.values):
                    counts[store.path] = counts.get(store.path, 0) + 1
        return counts

    def memory_report(self, tokens: int | None = None) -> dict[str, float]:
        """Bytes actually held, by kind (``kvsvd.accounting``), each storage counted once, against
        a 16-bit dense cache of ``tokens`` tokens per sequence (default: the longest layer's
        timeline; pass the processed tokens when a press evicted some): ``ratio`` =
        dense16_bytes / total_bytes, the same whatever dtype the model computes in; a calibration
        (held once per model) is ``calibration_bytes``, beside the total, and ``ratio_all_in``
        charges it to this sequence.

        factors: token and right factors (or merged directions and norms); scales: int8/int4
        per-token scales; residual: dense recent tokens of compressed layers; uncompressed:
        layers outside the range, segments shorter than the rank, MiniCache retained tokens;
        rope: positions (or cos/sin tables) to re-rotate pre-RoPE keys, none for contiguous
        positions; calibration: calibrated bases and means; index: MiniCache merge masks, the
        kept columns of a shared-basis transform store. rebuilt_bytes: the dense reads ``memoize_reads`` keeps (not part
        of total: the compressed state does not need them).
        """
        live = [layer for layer in self.layers if layer.is_initialized]
        if tokens is None:
            tokens = max((layer.get_seq_length() for layer in live), default=0)
        batch = live[0].batch if live else 0
        return accounting.report(self.held_tensors(), accounting.dense16_bytes(self.model_config, tokens, batch))
