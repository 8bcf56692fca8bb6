"""What a kvsvd compression method is to the rest of kvsvd.

A method is one :class:`Method` (one file each, listed in ``kvsvd.methods.METHODS``): its own settings (a
small frozen dataclass that validates itself, held in ``CompressionConfig.params``), its default grouping,
how it compresses the oldest tokens of its layer groups, its budget rule for a ratio, its label and its
report family. ``CompressionConfig``, ``LowRankCache``, ``config_for_ratio`` and the grid ask the method;
none of them branches on its name.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..budget import ranks_for_ratio
from ..checks import choice, integer
from ..svd import QR_METHODS, SVD_METHODS
from ..timing import StageTimer

if TYPE_CHECKING:
    from ..cache import LayerGroup, LowRankCache
    from ..config import CompressionConfig

# the CompressionConfig fields every method reads (besides its params)
COMMON_FIELDS = ("method", "layer_group_size", "start_layer", "end_layer", "key_space", "dense_dtype",
                 "residual_length", "block_size")
FACTOR_DTYPES = ("bf16", "fp16", "fp32", "int8", "int4")


def present(value: Any) -> bool:
    """Whether a recorded method field holds a value (a results table holds NaN where a row has none)."""
    return isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and value == value)


@dataclass(frozen=True)
class SvdCall:
    """The SVD call of a method that runs one: ``svd`` names a function of ``kvsvd.SVD_METHODS`` (rsvd,
    full_svd, lowrank_svd), with ``n_iter`` power iterations, ``oversample`` extra sketch columns, the ``qr``
    of ``kvsvd.svd.QR_METHODS`` and the sketch's ``seed`` (compression is deterministic)."""
    n_iter: int = 2
    oversample: int = 8
    qr: str = "auto"
    svd: str = "rsvd"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_iter", "oversample", "seed"):
            integer(name, getattr(self, name), 0)
        choice("qr", self.qr, QR_METHODS)
        choice("svd", self.svd, tuple(SVD_METHODS))


@dataclass(frozen=True)
class Ranks:
    """The ranks of a factored method: ``rank_k`` / ``rank_v`` are the *total* rank of one compressed matrix
    (for xkv a group of G layers is one (tokens × G·H·d) matrix, so rank 256 at G=4 stores as many factor
    entries per token as rank 64 per layer); ``factor_dtype`` stores the token factor: bf16, fp16, fp32, or
    int8 / int4 with one symmetric bf16 scale per token (the right factor then in bf16)."""
    rank_k: int = 256
    rank_v: int = 384
    factor_dtype: str = "bf16"

    def __post_init__(self) -> None:
        integer("rank_k", self.rank_k, 1)
        integer("rank_v", self.rank_v, 1)
        choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)

    def rank(self, kind: str) -> int:
        """The rank of keys (``kind`` "k") or values ("v")."""
        return self.rank_k if kind == "k" else self.rank_v


@dataclass(frozen=True)
class Method:
    """A kvsvd compression method.

    Attributes:
        name: ``CompressionConfig.method``.
        family: the report's family (the headline shows the best row of each).
        group_size: layers per group when none is named.
        params: the frozen dataclass of its own settings (``CompressionConfig.params``), which validates
            itself on construction.
        compress: ``compress(x, config, *, kind, layers, heads, calibration, timer) -> store`` of one
            segment x (B, T, G, F) of a group's keys (kind "k") or values ("v"), in the model dtype.
        fixed_group: ``layer_group_size`` must be ``group_size``.
        joint: every group's prefill is coded in one call (:meth:`code`), not group by group.
        ranked: a ratio sets its ranks (``kvsvd.budget.ranks_for_ratio``, the grid's ``k_share`` splits them).
        needs_ratio: its budget is a ratio of its own params; a grid entry must name one.
        codes_windows: it codes a hybrid model's sliding-window layers too (in groups of their own, the segments
            that leave the window dropped); otherwise they stay dense, capped at their window.
    """
    name: str
    family: str
    group_size: int
    params: type
    compress: Callable | None = None
    fixed_group: bool = False
    joint: bool = False
    ranked: bool = True
    needs_ratio: bool = False
    codes_windows: bool = False
    # fields whose default depends on the model and the context (not on the entry alone): a row's label reads
    # them from the config the cell ran (its ``config``)
    resolved_in_label: tuple[str, ...] = ()

    def param_names(self) -> tuple[str, ...]:
        """The fields of its params dataclass."""
        return tuple(f.name for f in dataclasses.fields(self.params))

    def check(self, config: CompressionConfig) -> None:
        """Refuse a config this method cannot run: params of another method, or a group size it does not take."""
        if not isinstance(config.params, self.params):
            raise ValueError(f"params={config.params!r} does not fit method={self.name!r}; accepted: a "
                             f"{self.params.__name__}")
        if self.fixed_group and config.layer_group_size != self.group_size:
            raise ValueError(f"layer_group_size={config.layer_group_size} does not fit method={self.name!r}; "
                             f"accepted: {self.group_size}")

    def grid_keys(self) -> set[str]:
        """The keys a grid entry of this method takes: the common config fields, its params' fields, and
        ``ratio`` (with ``k_share``) where a ratio sets its ranks."""
        keys = {*COMMON_FIELDS, *self.param_names()}
        return keys | ({"ratio", "k_share"} if self.ranked else set())

    def for_ratio(self, ratio: float, tokens: int, model_config, group_size: int, reserve_tokens: int,
                  k_share: float, fields: dict) -> dict:
        """Flat config fields (``CompressionConfig.of``) whose ranks hold ≈ 1/``ratio`` of a 16-bit cache at
        ``tokens`` + ``reserve_tokens`` tokens, the reserved ones held dense (``kvsvd.budget.ranks_for_ratio``)."""
        from ..config import CompressionConfig
        if not self.ranked:
            raise ValueError(f"method={self.name!r} has no ranks that a ratio could size; accepted: "
                             "a method with ranks, or this method's own fields")
        fields.setdefault("residual_length", CompressionConfig.residual_length)
        rank_k, rank_v = ranks_for_ratio(
            ratio, tokens + reserve_tokens, model_config, group_size=group_size, start_layer=fields["start_layer"],
            residual_length=fields["residual_length"] + reserve_tokens, k_share=k_share,
            factor_dtype=fields.get("factor_dtype", Ranks.factor_dtype),
            dense_dtype=fields.get("dense_dtype", CompressionConfig.dense_dtype))
        return {"layer_group_size": group_size, "rank_k": rank_k, "rank_v": rank_v, **fields}

    def prepare(self, cache: LowRankCache, groups: list[list[int]]) -> Any:
        """What the cache holds once per model for this method (a calibration), or None."""
        return None

    def kept_when_dropped(self, store: Any) -> Any:
        """What of a store whose tokens left a sliding window stays held, because later stores share it, or None."""
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
            store_k = self.compress(k, cfg, kind="k", **kw)
            store_v = self.compress(v, cfg, kind="v", **kw)
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
        return issubclass(self.params, SvdCall)

    def label_parts(self, spec: dict, field: Callable[[str], Any]) -> list[str]:
        """The label's words after the name and budget; ``field(name)`` is the entry's value, else the default
        of its params or of ``CompressionConfig``, else None."""
        return [field("key_space"), field("factor_dtype")]

    def label(self, spec: dict, budget: str, ran: dict | None = None) -> str:
        """What an entry asked for: ``xkv G2 4x pre_rope bf16 q2``; ``budget`` is its ratio's words (`` 4x``);
        ``ran``, a row's config (``CompressionConfig.to_dict``), gives the :attr:`resolved_in_label` fields the
        entry left to the defaults. Recorded variants say so (``cos/sin tables``: pre-RoPE keys that held the
        model's cos/sin)."""
        from ..config import CompressionConfig

        spec = {**{k: ran[k] for k in self.resolved_in_label if ran and k in ran}, **spec}

        def field(name: str):
            value = spec.get(name)
            return value if present(value) else getattr(self.params, name, getattr(CompressionConfig, name, None))

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
