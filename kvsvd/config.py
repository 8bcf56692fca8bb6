"""CompressionConfig: what LowRankCache compresses and how, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .accounting import (ENTRY_BYTES, STORAGE_DTYPES, ModelShape, dense16_bytes,
                         factor_entry_bytes)
from .methods.transform import TransformConfig
from .svd import QR_METHODS, SVD_METHODS

METHODS = ("svd", "xkv", "minicache", "pca", "transform")
# layers per group when none is named: fixed by the method for svd/pca/minicache; xKV's 4 from its paper;
# the transform coder's 5 from the frontier grid (SmolLM2: 2.7-8x scored best with groups of 5)
DEFAULT_GROUP_SIZE = {"svd": 1, "pca": 1, "minicache": 2, "xkv": 4, "transform": 5}
SMALL_WINDOW_FROM = 8  # transform ratios from which config_for_ratio keeps an 8-token window, new blocks of 32
KEY_SPACES = ("pre_rope", "post_rope")
FACTOR_DTYPES = ("bf16", "fp16", "fp32", "int8", "int4")


def _int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}={value} is out of range; accepted: >= {lo}")


def _choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(accepted)}")


@dataclass(frozen=True)
class CompressionConfig:
    """How the prefill KV cache is compressed.

    Ranks are the *total* rank of one compressed matrix, as in xKV: for ``xkv`` a group of G
    layers is one (tokens × G·H·d) matrix, so rank_k=256 at G=4 stores as many factor entries
    per token as rank_k=64 per layer (the per-layer equivalent is rank / G). For ``svd`` and
    ``pca`` the matrix is one layer (tokens × H·d). ``minicache`` ignores the ranks. For
    ``transform`` they cap the latent columns the basis computes (the allocator keeps fewer).

    Attributes:
        method: ``svd`` (per layer), ``xkv`` (groups of ``layer_group_size`` adjacent layers
            concatenated along features, one shared token factor), ``minicache`` (SLERP merge
            of adjacent layer pairs, divergent tokens kept), ``pca`` (fixed calibrated bases),
            ``transform`` (xKV groups transform-coded: a per-prompt basis and rate-allocated
            quantised coefficients, ``kvsvd.methods.transform``).
        layer_group_size: G for ``xkv`` and ``transform`` (≥ 1); must be 1 for ``svd``/``pca``, 2 for
            ``minicache``.
        start_layer, end_layer: the compressed layers, inclusive; -1 means the last layer.
            Layers outside stay uncompressed. The range must split into whole groups.
        n_iter, oversample, qr, svd: the SVD call (``svd`` names a function of
            ``kvsvd.SVD_METHODS``: rsvd, full_svd, lowrank_svd).
        key_space: ``pre_rope`` (keys are un-rotated exactly with the model's cos/sin,
            compressed, and re-rotated on read) or ``post_rope``.
        factor_dtype: storage of the token factor: bf16, fp16, fp32, or int8 / int4 with one
            symmetric bf16 scale per token (the right factor is then kept in bf16).
        dense_dtype: storage of everything kept dense (the residual window, uncompressed layers,
            segments shorter than the rank, MiniCache's retained tokens): bf16, fp16 or fp32,
            read back in the model dtype. bf16 holds what a 16-bit serving cache holds.
        residual_length: most recent tokens kept dense and uncompressed.
        block_size: once more than residual_length + block_size tokens wait in the dense
            buffer, the oldest block_size are compressed as a new segment.
        calibration_path: safetensors file written by ``kvsvd.calibrate`` (``pca``, and ``transform``
            with ``basis="calibrated"``; its grouping must be this config's).
        minicache_t, minicache_gamma: SLERP weight t and retention threshold γ: tokens whose
            angle exceeds Ωmin + γ·(Ωmax − Ωmin) are kept unmerged.
        seed: seed of the randomized SVD sketch (compression is deterministic).
        transform: the transform coder's settings (``method="transform"`` only; default
            ``TransformConfig()``); its ``ratio`` sets the bytes, not the ranks.
    """

    method: str = "xkv"
    rank_k: int = 256
    rank_v: int = 384
    layer_group_size: int = 4
    start_layer: int = 0
    end_layer: int = -1
    n_iter: int = 2
    oversample: int = 8
    qr: str = "auto"
    svd: str = "rsvd"
    key_space: str = "pre_rope"
    factor_dtype: str = "bf16"
    dense_dtype: str = "bf16"
    residual_length: int = 32
    block_size: int = 512
    calibration_path: str | None = None
    minicache_t: float = 0.5
    minicache_gamma: float = 0.05
    seed: int = 0
    transform: TransformConfig | None = None

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        if self.method == "transform" and self.transform is None:
            object.__setattr__(self, "transform", TransformConfig())
        if self.transform is not None and (self.method != "transform" or not isinstance(self.transform, TransformConfig)):
            raise ValueError(f"transform={self.transform!r} applies to method='transform' only and must be a "
                             f"TransformConfig; got method={self.method!r}")
        for name in ("rank_k", "rank_v", "layer_group_size", "block_size"):
            _int(name, getattr(self, name), 1)
        for name in ("start_layer", "n_iter", "oversample", "residual_length", "seed"):
            _int(name, getattr(self, name), 0)
        _int("end_layer", self.end_layer, -1)
        if self.end_layer != -1 and self.start_layer > self.end_layer:
            raise ValueError(f"start_layer={self.start_layer} > end_layer={self.end_layer}; "
                             "accepted: start_layer <= end_layer (or end_layer=-1 for the last layer)")
        _choice("qr", self.qr, QR_METHODS)
        _choice("svd", self.svd, tuple(SVD_METHODS))
        _choice("key_space", self.key_space, KEY_SPACES)
        _choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        _choice("dense_dtype", self.dense_dtype, tuple(STORAGE_DTYPES))
        required_g = {"svd": 1, "pca": 1, "minicache": 2}.get(self.method)
        if required_g is not None and self.layer_group_size != required_g:
            raise ValueError(f"layer_group_size={self.layer_group_size} does not fit method={self.method!r}; "
                             f"accepted: {required_g}")
        calibrated = self.method == "pca" or (self.method == "transform" and self.transform.basis == "calibrated")
        if calibrated and not self.calibration_path:
            raise ValueError(f"method={self.method!r}{' with basis=calibrated' if self.method == 'transform' else ''} "
                             "needs calibration_path (a file written by `python -m kvsvd calibrate MODEL`)")
        if self.method == "transform" and self.transform.basis == "calibrated" and self.key_space != "pre_rope":
            raise ValueError(f"key_space={self.key_space!r} does not fit basis='calibrated' (`kvsvd calibrate` fits "
                             "pre-RoPE keys); accepted: key_space='pre_rope', or basis='prompt'")
        if self.calibration_path and not calibrated:
            raise ValueError(f"calibration_path applies to method='pca' and to method='transform' with "
                             f"basis='calibrated' only; got method={self.method!r}")
        if self.method == "minicache" and self.factor_dtype in ("int8", "int4"):
            raise ValueError(f"factor_dtype={self.factor_dtype!r} does not apply to minicache; accepted: bf16, fp16, fp32")
        if not 0.0 < self.minicache_t < 1.0:
            raise ValueError(f"minicache_t={self.minicache_t} is out of range; accepted: (0, 1)")
        if not 0.0 <= self.minicache_gamma <= 1.0:
            raise ValueError(f"minicache_gamma={self.minicache_gamma} is out of range; accepted: [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


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
    _choice("dense_dtype", dense_dtype, tuple(STORAGE_DTYPES))
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


def config_for_ratio(ratio: float, tokens: int, model_config, *, method: str = "xkv", layer_group_size: int | None = None,
                     k_share: float = 1 / 3, reserve_tokens: int = 0, **fields) -> CompressionConfig:
    """A CompressionConfig whose ranks hold ≈ 1/``ratio`` of a 16-bit dense cache's bytes at
    ``tokens`` tokens, whatever dtype the model computes in; with ``reserve_tokens``, at
    ``tokens + reserve_tokens`` tokens, the reserved ones (a question and its answer, appended
    after compression) held dense.

    Rank budgets are per group of G layers, so for ``svd``/``xkv``/``pca`` the first (layers mod G)
    layers stay dense and the rest splits into whole groups (unless ``start_layer`` is given);
    ``transform`` compresses every layer, the last group holding the remainder. Residual and
    scale bytes and the widths of ``factor_dtype`` and ``dense_dtype`` are budgeted as in
    :func:`ranks_for_ratio`. ``layer_group_size`` defaults to :data:`DEFAULT_GROUP_SIZE`.

    ``transform`` defaults, each from the frontier grid (SmolLM2, 2048 tokens, needle tasks), each
    overridden by naming the field:

    - groups of 5 layers, 4 sink tokens, blocks of 256 tokens per coefficient scale;
    - below 8×, a 32-token dense window and new blocks of 512 tokens; from 8× on (where the dense
      tokens are much of the budget), an 8-token window and new blocks of 32 tokens (the question
      and the answer are then coded as they arrive);
    - the basis calibrated once per model where ``calibration_path`` is given (``kvsvd calibrate``;
      it holds no per-prompt basis rows and scored higher at 16×), else each prompt's own.
    """
    _choice("method", method, tuple(m for m in METHODS if m != "minicache"))  # minicache has no ranks to size
    L = ModelShape.of(model_config).layers
    G = min(DEFAULT_GROUP_SIZE[method], L) if layer_group_size is None else layer_group_size
    if isinstance(G, bool) or not isinstance(G, int) or not 1 <= G <= L:
        raise ValueError(f"layer_group_size={G!r} is out of range; accepted: an int in [1, {L}] (the model's layers)")
    fields.setdefault("start_layer", 0 if method == "transform" else whole_groups_start(model_config, G))
    _int("reserve_tokens", reserve_tokens, 0)
    if method == "transform":
        fields = {**transform_window(ratio), **fields}
        fields.setdefault("basis", "calibrated" if fields.get("calibration_path") else "prompt")
        return _transform_for_ratio(ratio, tokens, model_config, G, reserve_tokens, fields)
    fields.setdefault("residual_length", CompressionConfig.residual_length)
    rank_k, rank_v = ranks_for_ratio(ratio, tokens + reserve_tokens, model_config, group_size=G,
                                     start_layer=fields["start_layer"],
                                     residual_length=fields["residual_length"] + reserve_tokens,
                                     k_share=k_share,
                                     factor_dtype=fields.get("factor_dtype", CompressionConfig.factor_dtype),
                                     dense_dtype=fields.get("dense_dtype", CompressionConfig.dense_dtype))
    return CompressionConfig(method=method, layer_group_size=G, rank_k=rank_k, rank_v=rank_v, **fields)


def transform_window(ratio: float) -> dict[str, int]:
    """The transform coder's default dense window and new-block size at ``ratio`` (see :func:`config_for_ratio`)."""
    small = isinstance(ratio, (int, float)) and ratio >= SMALL_WINDOW_FROM
    return {"residual_length": 8 if small else 32, "block_size": 32 if small else 512}


def _transform_for_ratio(ratio: float, tokens: int, model_config, G: int, reserve_tokens: int,
                         fields: dict) -> CompressionConfig:
    """``method="transform"``: the ratio goes to the allocator; the basis may use every latent
    column (rank G·F) unless rank_k / rank_v cap it. Refuses a ratio whose budget the dense parts
    (sinks, window, uncompressed layers) fill on their own."""
    shape = ModelShape.of(model_config)
    names = TransformConfig.__dataclass_fields__
    tc = TransformConfig(ratio=ratio, reserve_tokens=reserve_tokens,
                         **{k: fields.pop(k) for k in list(fields) if k in names})
    reserve = min(reserve_tokens, fields.get("block_size", CompressionConfig.block_size))  # as LowRankCache budgets it
    tokens += reserve
    fixed = dense_bytes(model_config, tokens, [l for g in shape.layer_groups(G, fields["start_layer"]) for l in g],
                        fields["residual_length"] + tc.sink_tokens + reserve,
                        fields.get("dense_dtype", CompressionConfig.dense_dtype))
    dense16 = dense16_bytes(model_config, tokens)
    if fixed >= dense16 / ratio:
        raise ValueError(f"ratio={ratio} is out of reach at {tokens} tokens: the sinks, residual window, "
                         f"uncompressed layers and reserved tokens alone hold {fixed:.0f} of the "
                         f"{dense16 / ratio:.0f} bytes it allows; accepted: ratio < {dense16 / fixed:.2f}, or fewer "
                         "sink_tokens / residual_length")
    fields.setdefault("rank_k", G * shape.features)
    fields.setdefault("rank_v", G * shape.features)
    return CompressionConfig(method="transform", layer_group_size=G, transform=tc, **fields)
