"""CompressionConfig: what LowRankCache compresses and how, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .svd import QR_METHODS, SVD_METHODS

METHODS = ("svd", "xkv", "minicache", "pca")
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
    ``pca`` the matrix is one layer (tokens × H·d). ``minicache`` ignores the ranks.

    Attributes:
        method: ``svd`` (per layer), ``xkv`` (groups of ``layer_group_size`` adjacent layers
            concatenated along features, one shared token factor), ``minicache`` (SLERP merge
            of adjacent layer pairs, divergent tokens kept), ``pca`` (fixed calibrated bases).
        layer_group_size: G for ``xkv`` (≥ 1); must be 1 for ``svd``/``pca``, 2 for ``minicache``.
        start_layer, end_layer: the compressed layers, inclusive; -1 means the last layer.
            Layers outside stay uncompressed. The range must split into whole groups.
        n_iter, oversample, qr, svd: the SVD call (``svd`` names a function of
            ``kvsvd.SVD_METHODS``: rsvd, full_svd, lowrank_svd).
        key_space: ``pre_rope`` (keys are un-rotated exactly with the model's cos/sin,
            compressed, and re-rotated on read) or ``post_rope``.
        factor_dtype: storage of the token factor: bf16, fp16, fp32, or int8 / int4 with one
            symmetric scale per token (the right factor is then kept in bf16).
        residual_length: most recent tokens kept dense and uncompressed.
        block_size: once more than residual_length + block_size tokens wait in the dense
            buffer, the oldest block_size are compressed as a new segment.
        calibration_path: safetensors file written by ``kvsvd.calibrate`` (``pca`` only).
        minicache_t, minicache_gamma: SLERP weight t and retention threshold γ: tokens whose
            angle exceeds Ωmin + γ·(Ωmax − Ωmin) are kept unmerged.
        seed: seed of the randomized SVD sketch (compression is deterministic).
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
    factor_dtype: str = "fp32"
    residual_length: int = 32
    block_size: int = 512
    calibration_path: str | None = None
    minicache_t: float = 0.5
    minicache_gamma: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
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
        required_g = {"svd": 1, "pca": 1, "minicache": 2}.get(self.method)
        if required_g is not None and self.layer_group_size != required_g:
            raise ValueError(f"layer_group_size={self.layer_group_size} does not fit method={self.method!r}; "
                             f"accepted: {required_g}")
        if self.method == "pca" and not self.calibration_path:
            raise ValueError("method='pca' needs calibration_path (a file written by kvsvd.calibrate)")
        if self.method == "minicache" and self.factor_dtype in ("int8", "int4"):
            raise ValueError(f"factor_dtype={self.factor_dtype!r} does not apply to minicache; accepted: bf16, fp16, fp32")
        if not 0.0 < self.minicache_t < 1.0:
            raise ValueError(f"minicache_t={self.minicache_t} is out of range; accepted: (0, 1)")
        if not 0.0 <= self.minicache_gamma <= 1.0:
            raise ValueError(f"minicache_gamma={self.minicache_gamma} is out of range; accepted: [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


FACTOR_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}  # per token-factor entry
SCALE_BYTES = 2  # int8/int4 token factors: one bf16 scale per token and matrix; the right factor is bf16


def factor_entry_bytes(factor_dtype: str) -> tuple[float, float, float]:
    """(token-factor entry, right-factor entry, per-token scale) bytes of a ``factor_dtype``."""
    _choice("factor_dtype", factor_dtype, FACTOR_DTYPES)
    if factor_dtype in ("int8", "int4"):
        return FACTOR_BYTES[factor_dtype], 2, SCALE_BYTES
    return FACTOR_BYTES[factor_dtype], FACTOR_BYTES[factor_dtype], 0


def ranks_for_ratio(ratio: float, tokens: int, group_size: int, features: int, *, num_layers: int,
                    start_layer: int = 0, residual_length: int = 0, rope_dim: int = 0,
                    k_share: float = 1 / 3, factor_dtype: str = "fp32", dense_itemsize: int = 4) -> tuple[int, int]:
    """(rank_k, rank_v) such that the whole cache holds ≈ 1/ratio of the dense K+V bytes.

    Budget in bytes per batch row, e = ``dense_itemsize`` (the model dtype): dense = 2·T·L·F·e.
    Held = uncompressed layers (2·T·F·e each) + residual (2·R·F·e per compressed layer) + RoPE
    tables (2·T·rope_dim·e, pre-RoPE keys) + factors: per group (T−R)·(r_k + r_v)·e_u +
    (r_k + r_v)·G·F·e_w, plus 2·(T−R) per-token scales for int8/int4 (``factor_entry_bytes``):
    narrower factors buy proportionally more rank. ``k_share`` of the total rank goes to keys:
    value-heavy splits (rank_k ≈ rank_v / 2) kept needle answers best in the exact-SVD
    measurement in shared/REFERENCES.md. A budget that would need more than the full rank
    min(T−R, G·F) raises (compression would hold more than the matrix).
    """
    if ratio <= 1:
        raise ValueError(f"ratio={ratio} is out of range; accepted: > 1")
    e_u, e_w, e_s = factor_entry_bytes(factor_dtype)
    groups = (num_layers - start_layer) // group_size
    n = tokens - residual_length
    budget = 2 * tokens * num_layers * features * dense_itemsize / ratio
    fixed = dense_itemsize * (2 * tokens * features * (num_layers - groups * group_size)
                              + 2 * residual_length * features * groups * group_size + 2 * tokens * rope_dim) \
        + groups * 2 * n * e_s
    total = (budget - fixed) / (groups * (n * e_u + group_size * features * e_w))
    if total < 2:
        raise ValueError(f"ratio={ratio} leaves no room for factors after residual/RoPE/uncompressed layers")
    rank_k = max(1, round(k_share * total))
    rank_v = max(1, round(total) - rank_k)
    full = min(n, group_size * features)
    if max(rank_k, rank_v) > full:
        raise ValueError(f"ratio={ratio} with factor_dtype={factor_dtype!r} asks for ranks ({rank_k}, {rank_v}) above "
                         f"the full rank {full} = min(T-R, G*F); accepted: a larger ratio or a wider factor_dtype")
    return rank_k, rank_v


def config_for_ratio(ratio: float, tokens: int, model_config, *, method: str = "xkv", layer_group_size: int = 4,
                     k_share: float = 1 / 3, dense_itemsize: int = 4, **fields) -> CompressionConfig:
    """A CompressionConfig whose ranks give ≈ ``ratio`` times fewer K+V bytes at ``tokens`` tokens
    than a dense cache of ``dense_itemsize``-byte entries (the model dtype: 4 for FP32, 2 for BF16).

    The first (layers mod G) layers stay dense so the rest splits into whole groups (unless
    ``start_layer`` is given); residual, RoPE and scale bytes and the width of ``factor_dtype``
    are budgeted as in :func:`ranks_for_ratio`.
    """
    text = model_config.get_text_config(decoder=True)
    L, d = text.num_hidden_layers, text.head_dim
    G = layer_group_size
    fields.setdefault("start_layer", L % G)
    fields.setdefault("residual_length", CompressionConfig.residual_length)
    rope = d if fields.get("key_space", CompressionConfig.key_space) == "pre_rope" else 0
    rank_k, rank_v = ranks_for_ratio(ratio, tokens, G, text.num_key_value_heads * d, num_layers=L,
                                     start_layer=fields["start_layer"], residual_length=fields["residual_length"],
                                     rope_dim=rope, k_share=k_share, dense_itemsize=dense_itemsize,
                                     factor_dtype=fields.get("factor_dtype", CompressionConfig.factor_dtype))
    return CompressionConfig(method=method, layer_group_size=G, rank_k=rank_k, rank_v=rank_v, **fields)
