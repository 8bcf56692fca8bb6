"""CompressionConfig: what LowRankCache compresses and how, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .accounting import STORAGE_DTYPES, ModelShape
from .budget import whole_groups_start
from .checks import choice, integer
from .methods import METHODS

KEY_SPACES = ("pre_rope", "post_rope")


@dataclass(frozen=True)
class CompressionConfig:
    """How the prefill KV cache is compressed: the fields every method reads, and the method's own ``params``.

    ``CompressionConfig(method="xkv", params=LowRankParams(rank_k=64, rank_v=96), layer_group_size=2)``;
    :meth:`of` builds the same from flat fields (a grid entry's keys), and :meth:`to_dict` gives them back.

    Attributes:
        method: a name of ``kvsvd.methods.METHODS``: ``svd`` (per layer), ``xkv`` (groups of
            ``layer_group_size`` adjacent layers concatenated along features, one shared token factor),
            ``minicache`` (SLERP merge of adjacent layer pairs, divergent tokens kept), ``pca`` (fixed
            calibrated bases), ``transform`` (xKV groups transform-coded: a basis and rate-allocated
            quantised coefficients, ``kvsvd.methods.transform``).
        params: the method's settings, an instance of its ``Method.params`` (``LowRankParams`` for svd/xkv,
            ``MiniCacheParams``, ``PcaParams``, ``TransformConfig``); None: its defaults.
        layer_group_size: G (≥ 1); 1 for ``svd``/``pca``, 2 for ``minicache``.
        start_layer, end_layer: the compressed layers, inclusive; -1 means the last layer.
            Layers outside stay uncompressed. The range must split into whole groups.
        key_space: ``pre_rope`` (keys are un-rotated exactly with the model's cos/sin,
            compressed, and re-rotated on read) or ``post_rope``.
        dense_dtype: storage of everything kept dense (the residual window, uncompressed layers,
            segments shorter than the rank, MiniCache's retained tokens): bf16, fp16 or fp32,
            read back in the model dtype. bf16 holds what a 16-bit serving cache holds.
        residual_length: most recent tokens kept dense and uncompressed.
        block_size: once more than residual_length + block_size tokens wait in the dense
            buffer, the oldest block_size are compressed as a new segment.
    """

    method: str = "xkv"
    params: Any = None
    layer_group_size: int = 4
    start_layer: int = 0
    end_layer: int = -1
    key_space: str = "pre_rope"
    dense_dtype: str = "bf16"
    residual_length: int = 32
    block_size: int = 512

    def __post_init__(self) -> None:
        choice("method", self.method, tuple(METHODS))
        if self.params is None:
            object.__setattr__(self, "params", self.spec.params())
        for name in ("layer_group_size", "block_size"):
            integer(name, getattr(self, name), 1)
        for name in ("start_layer", "residual_length"):
            integer(name, getattr(self, name), 0)
        integer("end_layer", self.end_layer, -1)
        if self.end_layer != -1 and self.start_layer > self.end_layer:
            raise ValueError(f"start_layer={self.start_layer} > end_layer={self.end_layer}; "
                             "accepted: start_layer <= end_layer (or end_layer=-1 for the last layer)")
        choice("key_space", self.key_space, KEY_SPACES)
        choice("dense_dtype", self.dense_dtype, tuple(STORAGE_DTYPES))
        self.spec.check(self)

    @classmethod
    def of(cls, method: str = "xkv", **fields) -> CompressionConfig:
        """The config of flat ``fields``: the common ones, and the method's params' (a field that is neither is
        refused by name)."""
        choice("method", method, tuple(METHODS))
        spec = METHODS[method]
        common = {f.name for f in dataclasses.fields(cls)} - {"method", "params"}
        own = spec.param_names()
        foreign = set(fields) - common - set(own)
        if foreign:
            named = ", ".join(f"{k}={fields[k]!r}" for k in sorted(foreign))
            raise ValueError(f"{named} {'do' if len(foreign) > 1 else 'does'} not apply to method={method!r}; it takes: "
                             f"{', '.join(sorted(common | set(own)))}")
        return cls(method, spec.params(**{k: v for k, v in fields.items() if k in own}),
                   **{k: v for k, v in fields.items() if k in common})

    @property
    def spec(self):
        """The method (``kvsvd.methods.METHODS``): its params, how it compresses, its budget rule."""
        return METHODS[self.method]

    def to_dict(self) -> dict:
        """Flat fields (:meth:`of` builds the config back from them)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        return {**out, **dataclasses.asdict(self.params)}


def config_for_ratio(ratio: float, tokens: int, model_config, *, method: str = "xkv", layer_group_size: int | None = None,
                     k_share: float = 1 / 3, reserve_tokens: int = 0, **fields) -> CompressionConfig:
    """A CompressionConfig whose bytes are ≈ 1/``ratio`` of a 16-bit dense cache's at ``tokens`` tokens,
    whatever dtype the model computes in; with ``reserve_tokens``, at ``tokens + reserve_tokens`` tokens, the
    reserved ones (a question and its answer, appended after compression) held dense.

    ``layer_group_size`` defaults to the method's (``Method.group_size``, at most the model's layers). The
    method's budget rule (``Method.for_ratio``) sets the rest:

    - ``svd``/``xkv``/``pca``: ranks from :func:`kvsvd.budget.ranks_for_ratio` (residual and scale bytes and
      the widths of ``factor_dtype`` and ``dense_dtype`` budgeted), ``k_share`` of the rank to keys; the
      first (layers mod G) layers stay dense and the rest splits into whole groups unless ``start_layer``
      is given;
    - ``transform`` (``kvsvd.methods.transform.Transform.for_ratio``): every layer coded (a hybrid model's
      sliding-window layers in groups of their own), the last group of each kind holding the remainder; 4 sink
      tokens, blocks of 256 tokens per coefficient scale; below 8× a 32-token dense window and new blocks of 512
      tokens, from 8× an 8-token window and new blocks of 32
      (the question and the answer are then coded as they arrive), and below 8× too where the large window's
      dense parts would hold more than 40% of the budget; each prompt's own basis below 8×, from 8×
      the basis calibrated once per model (``python -m kvsvd calibrate MODEL`` writes it where
      ``kvsvd.calibrate.default_path`` looks; a missing file is refused with that command, ``basis="prompt"``
      keeps the per-prompt basis).

    Any field named (a common field or one of the method's params) overrides the default.
    """
    choice("method", method, tuple(METHODS))
    spec = METHODS[method]
    L = ModelShape.of(model_config).layers
    G = min(spec.group_size, L) if layer_group_size is None else layer_group_size
    if isinstance(G, bool) or not isinstance(G, int) or not 1 <= G <= L:
        raise ValueError(f"layer_group_size={G!r} is out of range; accepted: an int in [1, {L}] (the model's layers)")
    fields.setdefault("start_layer", 0 if spec.joint else whole_groups_start(model_config, G))
    integer("reserve_tokens", reserve_tokens, 0)
    return CompressionConfig.of(method, **spec.for_ratio(ratio, tokens, model_config, G, reserve_tokens, k_share,
                                                          fields))
