"""What a kvsvd compression method is to the rest of kvsvd.

A method is one :class:`Method` (one file each, listed in ``kvsvd.methods.METHODS``): the fields of
``CompressionConfig`` it reads, its default grouping, how it compresses the oldest tokens of its layer
groups, its budget rule for a ratio, its label and its report family. ``CompressionConfig``,
``LowRankCache``, ``config_for_ratio`` and the grid ask the method; none of them branches on its name.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..budget import ranks_for_ratio
from ..timing import StageTimer

if TYPE_CHECKING:
    from ..cache import LayerGroup, LowRankCache
    from ..config import CompressionConfig

# the CompressionConfig fields every method reads
COMMON_FIELDS = ("method", "layer_group_size", "start_layer", "end_layer", "key_space", "dense_dtype",
                 "residual_length", "block_size", "seed")
# the fields of the randomized SVD call
SVD_FIELDS = ("n_iter", "oversample", "qr", "svd")


def present(value: Any) -> bool:
    """Whether a recorded method field holds a value (a results table holds NaN where a row has none)."""
    return isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and value == value)


@dataclass(frozen=True)
class Method:
    """A kvsvd compression method.

    Attributes:
        name: ``CompressionConfig.method``.
        family: the report's family (the headline shows the best row of each).
        group_size: layers per group when none is named.
        fields: the ``CompressionConfig`` fields it reads beyond :data:`COMMON_FIELDS`; any other field
            left from its default is refused.
        compress: ``compress(x, rank, config, *, kind, layers, heads, calibration, timer) -> store`` of one
            segment x (B, T, G, F) of a group's keys (kind "k") or values ("v"), in the model dtype.
        fixed_group: ``layer_group_size`` must be ``group_size``.
        joint: every group's prefill is coded in one call (:meth:`code`), not group by group.
        ranked: a ratio sets its ranks (``kvsvd.budget.ranks_for_ratio``, the grid's ``k_share`` splits them).
        params: the dataclass of its own settings, held in ``CompressionConfig.transform`` (default: its
            defaults), or None.
    """
    name: str
    family: str
    group_size: int
    fields: tuple[str, ...]
    compress: Callable | None = None
    fixed_group: bool = False
    joint: bool = False
    ranked: bool = True
    params: type | None = None

    def check(self, config: CompressionConfig) -> None:
        """Refuse a config this method cannot run: a group size it does not take, or a field it does not read
        set away from its default."""
        if self.fixed_group and config.layer_group_size != self.group_size:
            raise ValueError(f"layer_group_size={config.layer_group_size} does not fit method={self.name!r}; "
                             f"accepted: {self.group_size}")
        taken = set(COMMON_FIELDS) | set(self.fields)
        for f in dataclasses.fields(config):
            if f.name not in taken and getattr(config, f.name) != f.default:
                raise ValueError(f"{f.name}={getattr(config, f.name)!r} does not apply to method={self.name!r}; "
                                 f"it takes: {', '.join(sorted(taken - {'method'}))}")

    def grid_keys(self) -> set[str]:
        """The keys a grid entry of this method takes: its config fields, and ``ratio`` (with ``k_share`` for
        ranked methods) where a ratio sets its budget."""
        keys = {*COMMON_FIELDS, *self.fields}
        return keys | ({"ratio", "k_share"} if self.ranked else set())

    def for_ratio(self, ratio: float, tokens: int, model_config, group_size: int, reserve_tokens: int,
                  k_share: float, fields: dict) -> dict:
        """``CompressionConfig`` fields (besides ``method``) whose ranks hold ≈ 1/``ratio`` of a 16-bit cache at
        ``tokens`` + ``reserve_tokens`` tokens, the reserved ones held dense (``kvsvd.budget.ranks_for_ratio``)."""
        from ..config import CompressionConfig
        if not self.ranked:
            raise ValueError(f"method={self.name!r} has no ranks that a ratio could size; accepted: "
                             "a method with ranks, or this method's own fields")
        fields.setdefault("residual_length", CompressionConfig.residual_length)
        rank_k, rank_v = ranks_for_ratio(
            ratio, tokens + reserve_tokens, model_config, group_size=group_size, start_layer=fields["start_layer"],
            residual_length=fields["residual_length"] + reserve_tokens, k_share=k_share,
            factor_dtype=fields.get("factor_dtype", CompressionConfig.factor_dtype),
            dense_dtype=fields.get("dense_dtype", CompressionConfig.dense_dtype))
        return {"layer_group_size": group_size, "rank_k": rank_k, "rank_v": rank_v, **fields}

    def prepare(self, cache: LowRankCache, groups: list[list[int]]) -> Any:
        """What the cache holds once per model for this method (a calibration), or None."""
        return None

    def held_once(self, state: Any) -> list[torch.Tensor]:
        """The tensors of :meth:`prepare`'s state that the cache counts as ``calibration`` (beside its stores')."""
        return []

    def code(self, cache: LowRankCache, jobs: list[tuple[LayerGroup, int]], whole_cache: bool) -> None:
        """Compress the n oldest residual tokens of each (group, n) into the group's next segment, logging the
        time and the paths in ``cache.compression_log``. ``whole_cache``: these are the prefill's tokens."""
        cfg = cache.config
        for group, n in jobs:
            k, v = group.take_oldest(n)
            timer = StageTimer()
            t0 = time.perf_counter()
            kw = dict(layers=group.layers, heads=cache.shape.kv_heads, calibration=cache.calibration, timer=timer)
            store_k = self.compress(k, cfg.rank_k, cfg, kind="k", **kw)
            store_v = self.compress(v, cfg.rank_v, cfg, kind="v", **kw)
            if k.device.type == "cuda":
                torch.cuda.synchronize()
            cache.compression_log.append({"layers": group.layers, "tokens": n, "ms": (time.perf_counter() - t0) * 1e3,
                                          "breakdown_ms": timer.breakdown_ms(), "paths": [store_k.path, store_v.path]})
            group.add_segment(n, store_k, store_v)

    def reads_calibration(self, spec: dict) -> bool:
        """Whether the grid entry ``spec`` codes with the model's default calibration file
        (``kvsvd.calibrate.default_path``, made by the grid when missing)."""
        return False

    def runs_svd(self, spec: dict) -> bool:
        """Whether the method entry ``spec`` (a grid method dict) calls an SVD function: its label then says
        which path the matrices ran."""
        return "svd" in self.fields

    def label_parts(self, spec: dict, field: Callable[[str], Any]) -> list[str]:
        """The label's words after the name and budget; ``field(name)`` is the entry's value, else the
        ``CompressionConfig`` default, else None."""
        return [field("key_space"), field("factor_dtype")]

    def label(self, spec: dict, budget: str) -> str:
        """What an entry asked for: ``xkv G2 4x pre_rope bf16 q2``; ``budget`` is its ratio's words (`` 4x``).
        Recorded variants say so (``cos/sin tables``: pre-RoPE keys that held the model's cos/sin)."""
        from ..config import CompressionConfig

        def field(name: str):
            value = spec.get(name)
            return value if present(value) else getattr(CompressionConfig, name, None)

        G = spec.get("layer_group_size")
        G = G if present(G) else self.group_size
        parts = [self.name + ("" if self.fixed_group else f" G{int(G)}") + budget, *self.label_parts(spec, field)]
        if spec.get("rope_tables") is True:
            parts.append("cos/sin tables")
        if field("dense_dtype") != CompressionConfig.dense_dtype:
            parts.append(f"dense {field('dense_dtype')}")
        if self.runs_svd(spec):
            if field("svd") in ("rsvd", "lowrank_svd"):
                parts.append(f"q{int(field('n_iter'))}")
            if field("qr") != "auto":
                parts.append(f"qr={field('qr')}")
            if field("svd") != "rsvd":
                parts.append(field("svd"))
        return " ".join(parts)
