"""CompressionConfig: what LowRankCache compresses and how, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .accounting import STORAGE_DTYPES, ModelShape
from .budget import whole_groups_start
from .checks import choice, integer
from .methods import METHODS
from .methods.transform import TransformConfig
from .svd import QR_METHODS, SVD_METHODS

KEY_SPACES = ("pre_rope", "post_rope")
FACTOR_DTYPES = ("bf16", "fp16", "fp32", "int8", "int4")


@dataclass(frozen=True)
class CompressionConfig:
    """How the prefill KV cache is compressed.

    Ranks are the *total* rank of one compressed matrix, as in xKV: for ``xkv`` a group of G
    layers is one (tokens × G·H·d) matrix, so rank_k=256 at G=4 stores as many factor entries
    per token as rank_k=64 per layer (the per-layer equivalent is rank / G). For ``svd`` and
    ``pca`` the matrix is one layer (tokens × H·d). ``minicache`` ignores the ranks. For
    ``transform`` they cap the latent columns the basis computes (the allocator keeps fewer).

    Every method reads the fields its ``kvsvd.methods`` entry names (``Method.fields``) besides the common
    ones (group, layer range, key space, dense storage, window, blocks, seed); any other field set away from
    its default is refused.

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
        choice("method", self.method, tuple(METHODS))
        if self.transform is None and self.spec.params is not None:
            object.__setattr__(self, "transform", self.spec.params())
        for name in ("rank_k", "rank_v", "layer_group_size", "block_size"):
            integer(name, getattr(self, name), 1)
        for name in ("start_layer", "n_iter", "oversample", "residual_length", "seed"):
            integer(name, getattr(self, name), 0)
        integer("end_layer", self.end_layer, -1)
        if self.end_layer != -1 and self.start_layer > self.end_layer:
            raise ValueError(f"start_layer={self.start_layer} > end_layer={self.end_layer}; "
                             "accepted: start_layer <= end_layer (or end_layer=-1 for the last layer)")
        choice("qr", self.qr, QR_METHODS)
        choice("svd", self.svd, tuple(SVD_METHODS))
        choice("key_space", self.key_space, KEY_SPACES)
        choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        choice("dense_dtype", self.dense_dtype, tuple(STORAGE_DTYPES))
        self.spec.check(self)

    @property
    def spec(self):
        """The method (``kvsvd.methods.METHODS``): what it reads, how it compresses, its budget rule."""
        return METHODS[self.method]

    def to_dict(self) -> dict:
        return asdict(self)


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
    - ``transform`` (``kvsvd.methods.transform.Transform.for_ratio``): every layer coded, the last group
      holding the remainder; 4 sink tokens, blocks of 256 tokens per coefficient scale; below 8× a
      32-token dense window and new blocks of 512 tokens, from 8× an 8-token window and new blocks of 32
      (the question and the answer are then coded as they arrive); the basis calibrated once per model
      where ``calibration_path`` is given (``kvsvd calibrate``), else each prompt's own.

    Any field named overrides the default.
    """
    choice("method", method, tuple(METHODS))
    spec = METHODS[method]
    L = ModelShape.of(model_config).layers
    G = min(spec.group_size, L) if layer_group_size is None else layer_group_size
    if isinstance(G, bool) or not isinstance(G, int) or not 1 <= G <= L:
        raise ValueError(f"layer_group_size={G!r} is out of range; accepted: an int in [1, {L}] (the model's layers)")
    fields.setdefault("start_layer", 0 if spec.joint else whole_groups_start(model_config, G))
    integer("reserve_tokens", reserve_tokens, 0)
    return CompressionConfig(method=method, **spec.for_ratio(ratio, tokens, model_config, G, reserve_tokens, k_share,
                                                             fields))
