"""``transform``: transform coding of a layer group's K or V, decoded from its codes.

x (B, T, G, F) of one segment (keys pre-RoPE) is mean-centred per sequence and decorrelated by
its top right singular vectors Vᵀ (B, r, G·F) (:func:`basis`): coefficients C = (x − μ)·V (B, T, r).
Each latent column i gets bᵢ bits per entry, one of its quantiser's :data:`CODES`: a midrise uniform
quantiser per block of ``block_tokens`` tokens whose step is Gaussian-optimal for the block's scale, with
the block's mean as offset (both held in bf16, the bits bit-packed into uint8); with
``quantiser="vector"``, below 3 bits, one index per run of 4 or 8 tokens of the column standardised by
its blocks' σ and mean, into a codebook trained on N(0, I) (:mod:`kvsvd.codebook`: 0.25 to 2 bits per
entry). The scale is the block's standard deviation; an 8-bit column's is raised where needed so that
its code reaches the block's largest deviation (``block_scale="unclipped"``): a token unlike the rest of
its block (a needle in its haystack) has coefficients of 10σ and more on some columns, which a σ-scaled
quantiser clips at ±3.9σ even at 8 bits (``block_scale="std"``). A column with 0 bits is dropped with
its basis row. Rank truncation (0 or full bits) and uniform
quantisation (equal bits) are special cases of the same code.

Allocation is one Lagrangian over every matrix of a call (all groups, K and V): each column
takes the b minimising Dᵢ(b) + λ·bytesᵢ(b), where Dᵢ(b) is the column's modelled squared error
at b bits (the Gaussian quantiser's MSE per block; Σcᵢ² at 0 bits) and bytesᵢ(b) its codes, basis
row and block scales; λ is bisected to the largest
allocation that fits the byte budget. For the Gaussian model Dᵢ(b) = σᵢ²·4^(−b) with continuous
b this is reverse water-filling, bᵢ = max(0, ½·log₂(σᵢ²/θ)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch

from .. import accounting, codebook
from ..accounting import ENTRY_BYTES, SCALE_BYTES, ModelShape
from ..budget import dense_bytes
from ..store import CodedColumns, DenseStore, Factors, dequantize_rows, quantize_rows
from ..svd import get_svd, gram_matrix, svd_path
from ..timing import StageTimer, maybe_stage
from ..checks import choice, integer, number
from .base import COMMON_FIELDS, Method, SvdCall, present

if TYPE_CHECKING:
    from ..cache import LayerGroup, LowRankCache
    from ..config import CompressionConfig

Tensor = torch.Tensor
# step, in standard deviations, of the MSE-optimal midrise uniform quantiser of a Gaussian, by bits
# (Max 1960; tests/test_transform.py re-derives them by numerical integration)
GAUSS_STEP = {1: 1.59577, 2: 0.99568, 3: 0.58602, 4: 0.33520, 5: 0.18814, 6: 0.10406, 7: 0.05687, 8: 0.03076}
# its MSE in σ² (at 8 bits the granular Δ²/12: the ±3.9σ overload is next to never reached)
GAUSS_MSE = {1: 0.36338, 2: 0.11885, 3: 0.03744, 4: 0.01154, 5: 0.0034952, 6: 0.0010400, 7: 0.00030433,
             8: GAUSS_STEP[8] ** 2 / 12}
BASIS_DTYPES = ("bf16", "int8", "int4")
BLOCK_SCALES = ("unclipped", "std")
BASES = ("prompt", "calibrated")
MEANS = ("basis", "prompt")
QUANTISERS = ("scalar", "vector")
WEIGHTINGS = ("mse", "output")
INDEX_BYTES = 2  # a shared-basis store names each kept column's basis row in int16
OVERLOAD_8 = (1 << 7) * GAUSS_STEP[8]  # an 8-bit code's reach, in steps of the Gaussian 8-bit quantiser: ±3.94 scales
BASIS_BITS = {"int8": 8, "int4": 4}  # quantised basis rows: int8, or two 4-bit values per uint8
STAT_BYTES = 2 * ENTRY_BYTES["bf16"]  # per block and kept column: std and mean in bf16
MEASURE_EVERY = 8  # the recorded reconstruction error is measured on every 8th token
# attention reads a store's codes without dequantising them (CodedColumns) from this many coefficients (tokens ×
# kept columns) on; below it, dequantising once for the group's layers costs less than folding per layer
# (SmolLM2-shaped groups on a 2-core CPU: equal near 3000 tokens × 400 columns)
FOLD_FROM = 1 << 20
LOW_RATE_FROM = 8  # ratios from which the defaults keep an 8-token window, code new blocks of 32, calibrated basis
# below LOW_RATE_FROM, the defaults keep the small window too where the large one's dense parts (sinks, window,
# the reserved question and answer) would hold more than this share of the budget: a short context, or a
# hybrid model whose sliding layers hold few tokens. Between the frontier grid's two measured cases: SmolLM2
# at 2048 tokens, 4x (shares 0.20-0.37), where the large window scored 3.5 points higher (not significant),
# and Gemma 3 270M at 4096 tokens, 4x (0.47-0.51), where the small one scored 22.8 points higher.
DENSE_SHARE = 0.4
SMALL_WINDOW = {"residual_length": 8, "block_size": 32}
LARGE_WINDOW = {"residual_length": 32, "block_size": 512}
# from TINY_WINDOW_FROM, a 4-token window and new blocks of 16: the frontier grid (SmolLM2, 2048 tokens, 16x
# calibrated) scored it 6.7 points [+0.6, +13.1] above SMALL_WINDOW, whose dense tail held ~30% of the budget
TINY_WINDOW_FROM = 16
TINY_WINDOW = {"residual_length": 4, "block_size": 16}


@dataclass(frozen=True)
class TransformConfig(SvdCall):
    """The transform coder's own settings (``CompressionConfig(method="transform", params=...)``), with the SVD
    call that fits a per-prompt basis (:class:`~kvsvd.methods.base.SvdCall`).

    Attributes:
        ratio: the whole cache holds ≈ 1/ratio of a 16-bit dense cache's bytes right after the
            prefill is compressed (the sinks, windows, RoPE positions and uncompressed layers
            included); later blocks are coded at 1/ratio of their own 16-bit bytes, on the
            prefill's basis and mean (held once).
        rank_k, rank_v: the most latent columns the basis of a key / value matrix computes (the allocator
            keeps fewer); None: all of them (G·F).
        basis_dtype: storage of the per-prompt basis rows: ``int8`` or ``int4`` (one bf16 scale
            per row, ``kvsvd.store.quantize_rows``) or ``bf16``.
        sink_tokens: the first tokens of the timeline, kept dense in ``dense_dtype``.
        block_tokens: tokens per coefficient block (one std and one mean per kept column).
        value_weight: the allocator's weight on a value's squared error against a key's (> 0).
        block_scale: a block's quantiser scale per column: σ, except that ``unclipped`` raises an
            8-bit column's to max(σ, max|c − mean| / 3.94), so that its code reaches the block's
            largest deviation; ``std`` keeps σ (the Gaussian-optimal step, which clips a block's
            outlying tokens) at every width.
        basis: ``prompt`` (each prompt's own principal directions, fitted when its prefill is coded
            and held in its bytes, ``basis_dtype`` rows of the kept columns and a bf16 mean) or
            ``calibrated`` (the principal directions and mean of each layer group fitted once per model
            by ``kvsvd calibrate``, read from ``calibration_path`` and held once per model in
            ``basis_dtype``: a prompt holds its codes, block statistics and an int16 index of its
            kept columns; no SVD runs).
        mean: the offset coefficients are taken from: ``basis`` (the one fitted with the basis: the
            calibration's for a calibrated basis, each prompt's own for its own) or ``prompt`` (each prompt's own
            mean, also on a calibrated basis: G·F bf16 per group and kind, held by the prompt's first coded
            segment and shared by its later blocks).
        weighting: what the allocator minimises: ``mse`` (every column's squared error in K or V) or
            ``output`` (each column's squared error weighted by what it costs downstream, calibrated once per
            model by ``kvsvd calibrate``: a key column by the queries' energy along it, a value column by
            o_proj's; needs ``calibration_path``, whatever the basis).
        quantiser: the codes a column may take: ``scalar`` (the uniform scalar quantiser at 1, 2, 3, 4 or 8
            bits per entry) or ``vector`` (below 3 bits one index per run of 8 tokens at 0.25, 0.5, 0.75 or
            1 bit per entry, or of 4 tokens at 1.5 or 2, into a codebook trained on N(0, I): :mod:`kvsvd.codebook`;
            the scalar quantiser at every width from 3 to 8 bits).
        calibration_path: the safetensors file of ``kvsvd calibrate`` that ``basis="calibrated"`` or
            ``weighting="output"`` reads (its grouping must be the config's); refused otherwise.
        reserve_tokens: tokens still to come after the prefill (a question and its answer): up to
            ``block_size`` of them are budgeted as held dense, the rest as coded in blocks, so that
            the ratio is met at the end of the timeline rather than right after the prefill.
    """
    ratio: float = 8.0
    rank_k: int | None = None
    rank_v: int | None = None
    basis_dtype: str = "int8"
    sink_tokens: int = 4
    block_tokens: int = 256
    value_weight: float = 1.0
    reserve_tokens: int = 0
    block_scale: str = "unclipped"
    basis: str = "prompt"
    mean: str = "basis"
    weighting: str = "mse"
    quantiser: str = "scalar"
    calibration_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        number("ratio", self.ratio, "a number > 1", lambda r: r > 1)
        number("value_weight", self.value_weight, "a number > 0", lambda w: w > 0)
        for name in ("rank_k", "rank_v"):
            if getattr(self, name) is not None:
                integer(name, getattr(self, name), 1)
        choice("basis_dtype", self.basis_dtype, BASIS_DTYPES)
        choice("basis", self.basis, BASES)
        choice("mean", self.mean, MEANS)
        choice("weighting", self.weighting, WEIGHTINGS)
        choice("quantiser", self.quantiser, QUANTISERS)
        choice("block_scale", self.block_scale, BLOCK_SCALES)
        integer("sink_tokens", self.sink_tokens, 0)
        integer("block_tokens", self.block_tokens, 1)
        integer("reserve_tokens", self.reserve_tokens, 0)
        for name, calibrated in (("basis='calibrated'", self.basis == "calibrated"),
                                 ("weighting='output'", self.weighting == "output")):
            if calibrated and not self.calibration_path:
                raise ValueError(f"method='transform' with {name} needs calibration_path (a file written by "
                                 "`python -m kvsvd calibrate MODEL`)")
        if self.calibration_path and not uses_calibration(self):
            raise ValueError("calibration_path applies to method='transform' with basis='calibrated' or "
                             f"weighting='output' only; got basis={self.basis!r}, weighting={self.weighting!r}")

    def rank(self, kind: str, features: int) -> int:
        """The basis columns of a ``kind`` ("k" or "v") matrix of ``features`` (G·F) features."""
        cap = self.rank_k if kind == "k" else self.rank_v
        return features if cap is None else min(cap, features)


# -- bit packing ------------------------------------------------------------------------------
def planes(bits: int) -> list[int]:
    """The byte-aligned planes a ``bits``-bit code is packed in, low bits first: 3 → [2, 1], 6 → [4, 2]."""
    if bits not in range(1, 9):
        raise ValueError(f"bits={bits} is not a code width; accepted: 1 to 8")
    return [p for p in (8, 4, 2, 1) if bits & p]


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """q uint8 (B, N) with values < 2^bits → (B, bytes) uint8: 8/bits values per byte for 1, 2 and 4
    bits, q itself for 8, and for 3, 5, 6, 7 bits one such plane per power of two of :func:`planes`
    (3 bits: ⌈N/4⌉ + ⌈N/8⌉ bytes). Every plane is byte-aligned, so unpacking is one shift-and-mask."""
    if len(planes(bits)) > 1:
        out, shift = [], 0
        for p in planes(bits):
            out.append(pack_bits((q >> shift) & ((1 << p) - 1), p))
            shift += p
        return torch.cat(out, -1)
    if bits == 8:  # a copy: q may be a view of a larger (block-padded) buffer, which would stay held
        return q.clone(memory_format=torch.contiguous_format)
    per = 8 // bits
    q = torch.nn.functional.pad(q, (0, -q.shape[1] % per)).reshape(q.shape[0], -1, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (i * bits)
    return out


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: (B, n) uint8."""
    if len(planes(bits)) > 1:
        out, shift, start = 0, 0, 0
        for p in planes(bits):
            size = -(-n * p // 8)  # bytes of this plane
            out = out | (unpack_bits(packed[:, start:start + size], p, n) << shift)
            shift, start = shift + p, start + size
        return out
    if bits == 8:
        return packed[:, :n]
    mask = (1 << bits) - 1  # scalar shifts: a broadcast uint8 shift tensor is ~40x slower on CPU
    return torch.stack([(packed >> i) & mask for i in range(0, 8, bits)], -1).reshape(packed.shape[0], -1)[:, :n]


# -- the per-column block quantiser ----------------------------------------------------------
def block_stats(c: Tensor, block: int, scale: str = "unclipped") -> Tensor:
    """Scale and mean of every column per block of ``block`` tokens, rounded to bf16 as held:
    c (B, T, r) float32 → (B, ⌈T/block⌉, r, 2) bf16. The scale is σ (``std``), or max(σ, the
    largest |c − mean| / :data:`OVERLOAD_8`) (``unclipped``: an 8-bit code reaches every token)."""
    if not c.shape[-1]:  # no column (a basis that kept none): no statistics
        return c.new_zeros(c.shape[0], -(-c.shape[1] // block), 0, 2, dtype=torch.bfloat16)
    chunks = c.split(block, dim=1)
    mean = torch.stack([x.mean(1) for x in chunks], 1)
    std = torch.stack([x.std(1, correction=0) for x in chunks], 1)
    if scale == "unclipped":
        reach = torch.stack([(x - m[:, None]).abs().amax(1) for x, m in zip(chunks, mean.unbind(1))], 1)
        std = torch.maximum(std, reach / OVERLOAD_8)
    return torch.stack([std, mean], -1).to(torch.bfloat16)


def _blocks(x: Tensor, block: int) -> Tensor:
    """x (B, T, r) → (B, ⌈T/block⌉, block, r), the last block zero-padded."""
    B, T, r = x.shape
    return torch.nn.functional.pad(x, (0, 0, 0, -T % block)).view(B, -1, block, r)


def quantize(c: Tensor, stats: Tensor, bits: int, block: int) -> Tensor:
    """Codes uint8 (B, T, r) in [0, 2^bits) of c (B, T, r) with the blocks' ``stats``."""
    std, mean = stats.float().unsqueeze(2).unbind(-1)                         # (B, blocks, 1, r)
    step = (GAUSS_STEP[bits] * std).clamp_min(torch.finfo(torch.float32).tiny)
    half = 1 << (bits - 1)
    q = (torch.floor((_blocks(c, block) - mean) / step) + half).clamp(0, 2 * half - 1).to(torch.uint8)
    return q.flatten(1, 2)[:, :c.shape[1]]


def coded_columns(q: Tensor, stats: Tensor, bits: int, block: int) -> CodedColumns:
    """Codes q uint8 (B, T, r) of :func:`quantize` with their blocks' ``stats`` as :class:`CodedColumns`:
    Ĉ = (q − 2^(bits−1) + ½)·step + mean per block, step = the Gaussian step × the block's std (the codes
    centred on zero, so that a·Ĉᵀ sums no large terms that cancel)."""
    std, mean = stats.float().unbind(-1)                                       # (B, blocks, r)
    return CodedColumns(q.float().sub_((1 << (bits - 1)) - 0.5), GAUSS_STEP[bits] * std, mean, block)


def dequantize(q: Tensor, stats: Tensor, bits: int, block: int) -> Tensor:
    """Inverse of :func:`quantize` → float32 (B, T, r)."""
    return coded_columns(q, stats, bits, block).dense()


def vector_quantize(c: Tensor, stats: Tensor, tokens: int, index_bits: int, block: int) -> Tensor:
    """Indices uint8 (B, ⌈T/tokens⌉, r) of c (B, T, r): each column's runs of ``tokens`` tokens (the last one
    zero-padded), standardised by their blocks' ``stats`` (0 where a block's σ is 0), coded by the nearest
    point of the 2^index_bits-point codebook (:func:`kvsvd.codebook.nearest`)."""
    B, T, r = c.shape
    std, mean = stats.float().unsqueeze(2).unbind(-1)                         # (B, blocks, 1, r)
    z = torch.where(std > 0, (_blocks(c, block) - mean) / std, 0.0).flatten(1, 2)[:, :T]
    z = torch.nn.functional.pad(z, (0, 0, 0, -T % tokens)).view(B, -1, tokens, r).transpose(2, 3)
    index = codebook.nearest(z.reshape(-1, tokens), codebook.codebook(tokens, index_bits, c.device))
    return index.view(B, -1, r).to(torch.uint8)


def vector_columns(index: Tensor, stats: Tensor, tokens: int, index_bits: int, block: int, T: int) -> CodedColumns:
    """Indices (B, ⌈T/tokens⌉, r) of :func:`vector_quantize` as :class:`CodedColumns`: Ĉ = z·σ + mean per
    block, z the codebook's points (centred on zero, in σ) laid back token by token."""
    B, runs, r = index.shape
    z = codebook.codebook(tokens, index_bits, index.device)[index.long()]      # (B, runs, r, tokens)
    std, mean = stats.float().unbind(-1)
    return CodedColumns(z.transpose(2, 3).reshape(B, runs * tokens, r)[:, :T], std, mean, block)


@dataclass(frozen=True)
class Code:
    """A width a latent column is coded at: ``bits`` per entry, as one code per token (``tokens`` = 1: the scalar
    quantiser) or as one index of bits·tokens bits per run of ``tokens`` tokens (a codebook, :mod:`kvsvd.codebook`).
    Both read a block's σ and mean (``stats`` (B, blocks, r, 2) bf16)."""
    bits: float
    tokens: int = 1

    @property
    def index_bits(self) -> int:
        return round(self.bits * self.tokens)

    def mse(self) -> float:
        """Squared error per entry on N(0, 1): Max's quantiser's, or the codebook's on held-out points."""
        return GAUSS_MSE[self.bits] if self.tokens == 1 else codebook.held_out_mse(self.tokens, self.index_bits)

    def nbytes(self, T: int) -> float:
        """Bytes of one column's codes over T tokens (packed, the last run padded)."""
        return -(-T // self.tokens) * self.index_bits / 8

    def quantize(self, c: Tensor, stats: Tensor, block: int) -> Tensor:
        """Codes uint8 (B, ⌈T/tokens⌉, r) of c (B, T, r)."""
        if self.tokens == 1:
            return quantize(c, stats, self.index_bits, block)
        return vector_quantize(c, stats, self.tokens, self.index_bits, block)

    def columns(self, q: Tensor, stats: Tensor, block: int, T: int) -> CodedColumns:
        """The codes q (B, ⌈T/tokens⌉, r) of :meth:`quantize` read as CodedColumns."""
        if self.tokens == 1:
            return coded_columns(q, stats, self.index_bits, block)
        return vector_columns(q, stats, self.tokens, self.index_bits, block, T)


# a quantiser's widths, narrowest first: ``scalar`` the uniform scalar quantiser at 1, 2, 3, 4 and 8 bits per entry;
# ``vector`` the codebooks below 3 bits per entry (kvsvd.codebook.VECTOR_CODES) and the scalar one at 3 to 8 bits
CODES = {"scalar": (Code(0), Code(1), Code(2), Code(3), Code(4), Code(8)),
         "vector": (Code(0), *(Code(b, t) for b, (t, _) in codebook.VECTOR_CODES.items()), *map(Code, range(3, 9)))}


# -- analysis, allocation, encoding -----------------------------------------------------------
@dataclass
class Latents:
    """One matrix before allocation: c (B, T, r) float32 coefficients on the basis vh (B, r, G·F),
    mean (B, 1, G·F) bf16, x (B, T, G·F) the original, stats (B, blocks, r, 2) bf16 (σ and mean; stats8
    those of 8-bit columns, the same tensor unless ``block_scale="unclipped"``), distortion
    (r, widths) the Gaussian model's squared error at each of the quantiser's :data:`CODES` and cost (r, widths) its
    bytes."""
    kind: str
    layers: list[int]
    x: Tensor
    c: Tensor
    vh: Tensor
    mean: Tensor
    stats: Tensor
    stats8: Tensor
    distortion: Tensor
    cost: Tensor
    path: str
    shared: "TransformStore | None" = None  # the store whose basis (and mean, unless its own) the coefficients are on

    @property
    def owns_mean(self) -> bool:
        """Whether this matrix's store holds its mean (not a shared store's)."""
        return self.shared is None or self.mean is not self.shared.mean


def basis(xc: Tensor, rank: int, config, timer: StageTimer | None = None) -> tuple[Tensor, str]:
    """The top-``rank`` right singular vectors vh (B, rank, n) of centred xc (B, T, n) and the path
    that found them. Where kvsvd's cost model picks the exact Gram path (``svd_path``), the basis is
    the eigenvectors of xcᵀxc in FP32 (no left factor is formed: the coefficients are xc·vhᵀ);
    otherwise the configured SVD function runs and its vh is kept."""
    T, n = xc.shape[-2:]
    p = config.params
    path = svd_path(p.svd, T, n, rank, n_iter=p.n_iter, oversample=p.oversample, qr=p.qr)
    if path.kind == "gram":
        with maybe_stage(timer, "projection", xc.device):
            G = gram_matrix(xc)
        with maybe_stage(timer, "small_svd_fp32", xc.device):
            vh = torch.linalg.eigh(0.5 * (G + G.mT))[1][..., -rank:].flip(-1).mT
        return vh, path.label
    gen = torch.Generator(device=xc.device).manual_seed(p.seed)
    vh = get_svd(p.svd)(xc, rank, n_iter=p.n_iter, oversample=p.oversample, qr=p.qr, generator=gen, timer=timer)[2]
    return vh.float(), path.label


def analyse(x: Tensor, rank: int, config, *, kind: str, layers: list[int], timer: StageTimer | None = None,
            shared: "TransformStore | None" = None, weight: Tensor | None = None) -> Latents:
    """Mean-centre and factorise x (B, T, G, F), or with ``shared`` project it on that store's basis
    and mean (held once: a kept column then costs no basis row; a calibration store with ``mean="prompt"``:
    on x's own mean); model every column's error and bytes
    at every width: Dᵢ(0) = Σ cᵢ², Dᵢ(b) = Σ over blocks of tokens·σ²·MSE_b (the quantiser's MSE); with a
    feature ``weight`` (G·F,), column i's errors count wᵢ = Σ_f vᵢ_f²·weight_f times (its cost downstream)."""
    B, T, G, F = x.shape
    tc = config.params
    xf = x.reshape(B, T, G * F).float()
    if shared is None:
        mean = xf.mean(1, keepdim=True).to(torch.bfloat16)
        xc = xf - mean.float()
        vh, path = basis(xc, min(rank, T, G * F), config, timer)
        path = f"{path} transform {tc.basis_dtype}"
        row = B * G * F * ENTRY_BYTES[tc.basis_dtype] + (B * SCALE_BYTES if tc.basis_dtype in BASIS_BITS else 0)
    else:
        own = shared.calibration and tc.mean == "prompt"
        mean = xf.mean(1, keepdim=True).to(torch.bfloat16) if own else shared.mean
        vh, row = shared.basis_rows(slice(None)), INDEX_BYTES
        path = f"{'calibrated' if shared.calibration else 'shared'} basis transform {tc.basis_dtype}"
        xc = xf - mean.float()
    with maybe_stage(timer, "allocation", x.device):
        c = xc @ vh.mT
        stats = block_stats(c, tc.block_tokens, "std")
        stats8 = block_stats(c, tc.block_tokens, tc.block_scale) if tc.block_scale != "std" else stats
        lengths = torch.tensor([min(tc.block_tokens, T - i) for i in range(0, T, tc.block_tokens)])
        energy, energy8 = ((st[..., 0].float().square() * lengths[:, None]).sum((0, 1)).double()   # (r,)
                           for st in (stats, stats8))
        codes = CODES[tc.quantiser]
        distortion = torch.stack([c.square().sum((0, 1)).double()]
                                 + [(energy8 if code.bits == 8 else energy) * code.mse() for code in codes[1:]], -1)
        if weight is not None:
            distortion *= (vh.square() @ weight.to(vh)).mean(0).double()[:, None]
        per_bit = torch.tensor([B * code.nbytes(T) + (row + B * stats.shape[1] * STAT_BYTES if code.bits else 0)
                                for code in codes], dtype=torch.float64)
    return Latents(kind, layers, xf, c, vh, mean, stats, stats8, distortion, per_bit.expand(c.shape[-1], -1), path,
                   shared)


def allocate(latents: list[Latents], budget: float, config) -> tuple[list[Tensor], float]:
    """Width per column (an index into the quantiser's CODES) for every matrix, the largest allocation whose bytes
    (plus each new mean) fit ``budget``, values' errors weighted by ``value_weight``; returns
    (choices, λ)."""
    fixed = sum(lt.mean.numel() * lt.mean.element_size() for lt in latents if lt.owns_mean)
    D = torch.cat([lt.distortion * (config.params.value_weight if lt.kind == "v" else 1.0) for lt in latents])
    R = torch.cat([lt.cost for lt in latents])
    room = budget - fixed
    if room < R.min(1).values.sum():
        raise ValueError(f"ratio leaves {budget:.0f} bytes for the coded segments, less than their means "
                         f"({fixed} bytes) need; accepted: a smaller ratio, fewer sink_tokens or residual_length")

    def pick(lam: float) -> Tensor:
        return (D + lam * R).argmin(1)

    def spent(choice: Tensor) -> float:
        return float(R.gather(1, choice[:, None]).sum())

    scale = float(D.sum() / R.sum()) or 1.0
    lo, hi = -40.0, 40.0  # log2 of λ / scale: 2^-40 keeps every bit, 2^40 drops everything
    if spent(pick(scale * 2.0**lo)) <= room:
        hi = lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(pick(scale * 2.0**mid)) <= room else (mid, hi)
    lam = scale * 2.0**hi
    choice = pick(lam)
    return list(choice.split([lt.c.shape[-1] for lt in latents])), lam


@dataclass
class TransformStore:
    """x ≈ Ĉ·Vᵀ + μ for one segment of a group, K or V. Kept columns are ordered by width:
    ``widths`` ((:class:`Code`, columns), ...) widest first; ``codes`` one packed uint8 tensor (B, bytes)
    per width; ``stats`` (B, blocks, kept, 2) bf16 std and mean; ``basis`` (B, rows, G·F) bf16,
    or int8 / packed int4 (uint8) with ``basis_scale`` (B, rows, 1) bf16; ``mean`` (B, 1, G·F) bf16. A store coded on an
    earlier store's basis shares its ``basis``, ``basis_scale`` and ``mean`` tensors and names its
    kept columns' rows in ``rows`` (kept,) int16; one on a calibrated basis with its prompt's own mean holds
    that mean (``owns_mean``). A ``calibration`` store (:func:`calibration_store`) holds
    no codes: the basis and mean of a calibrated group, batch 1, held once per model."""
    widths: tuple[tuple[Code, int], ...]
    codes: list[Tensor]
    stats: Tensor
    basis: Tensor
    basis_scale: Tensor | None
    mean: Tensor
    tokens: int
    features: int
    block: int
    path: str
    allocation: dict
    rows: Tensor | None = None
    calibration: bool = False
    owns_mean: bool = False
    decoded: "Tensor | list[CodedColumns] | None" = field(default=None, repr=False)  # Ĉ while a forward reads the group

    def columns(self) -> list[CodedColumns]:
        """Ĉ's columns by width, unpacked from the codes but not dequantised."""
        out, col = [], 0
        for (code, n), packed in zip(self.widths, self.codes):
            runs = -(-self.tokens // code.tokens)
            q = unpack_bits(packed, code.index_bits, runs * n).reshape(-1, runs, n)
            out.append(code.columns(q, self.stats[:, :, col:col + n], self.block, self.tokens))
            col += n
        return out

    def coefficients(self) -> Tensor:
        """Ĉ float32 (B, T, kept) dequantised from the codes."""
        parts = [c.dense() for c in self.columns()]
        if not parts:
            return torch.zeros(self.stats.shape[0], self.tokens, 0, device=self.mean.device)
        return torch.cat(parts, -1)

    def basis_rows(self, cols: slice) -> Tensor:
        """The basis rows of this store's columns, restricted to features ``cols``: (B, kept, ·) float32."""
        scale = self.basis_scale
        start, stop, _ = cols.indices(self.mean.shape[-1])
        packed = self.basis.dtype == torch.uint8  # int4: two entries per byte (G·F and F are even)
        basis = self.basis[..., start // 2:stop // 2] if packed else self.basis[..., start:stop]
        if self.rows is not None:
            rows = self.rows.long()
            basis, scale = basis[:, rows], None if scale is None else scale[:, rows]
        if scale is None:
            return basis.float()
        return dequantize_rows(basis, scale, 4 if packed else 8, stop - start, torch.float32)

    def _read(self, j: int, coded: bool) -> "Tensor | list[CodedColumns]":
        """Ĉ for layer j's read, dequantised or as its :meth:`columns` (``coded``). The group's layers are
        read in turn within a forward: what the first read decoded is kept from one layer to the next
        and dropped after the last one. A store with fewer than :data:`FOLD_FROM` coefficients (none kept,
        or a short segment) gives Ĉ either way."""
        coded = coded and self.tokens * self.stats.shape[2] >= max(FOLD_FROM, 1)
        if self.decoded is None or isinstance(self.decoded, Tensor) == coded:
            self.decoded = self.columns() if coded else self.coefficients()
        c = self.decoded
        if j == self.mean.shape[-1] // self.features - 1:
            self.decoded = None
        return c

    def layer(self, j: int, dtype: torch.dtype) -> Tensor:
        """Layer j's (B, T, F) rebuilt: Ĉ·Vⱼᵀ + μⱼ."""
        cols = slice(j * self.features, (j + 1) * self.features)
        return (self._read(j, coded=False) @ self.basis_rows(cols) + self.mean[..., cols].float()).to(dtype)

    def latent(self, j: int, heads: int) -> Factors:
        """Layer j as Factors: u = Ĉ, as its coded columns (never dequantised) from :data:`FOLD_FROM`
        coefficients, w its basis rows (B|1, kept, heads, d), mean (B|1, heads, d): attention reads p·Ĉ and
        q·Vⱼ, never x."""
        cols = slice(j * self.features, (j + 1) * self.features)
        w = self.basis_rows(cols).unflatten(-1, (heads, self.features // heads))
        return Factors(self._read(j, coded=True), w, self.mean[:, 0, cols].float().unflatten(-1, (heads, -1)))

    def held(self) -> dict[str, list[Tensor]]:
        """The tensors this store holds by kind of ``kvsvd.accounting``; a store on another's basis
        holds its codes, statistics and row index (the basis and mean are its owner's to list)."""
        scale = [self.basis_scale] if self.basis_scale is not None else []
        if self.calibration:
            return {"calibration": [self.basis, self.mean, *scale]}
        out = {"codes": list(self.codes), "scales": [self.stats]}
        if self.rows is not None:
            return {**out, "index": [self.rows], **({"factors": [self.mean]} if self.owns_mean else {})}
        return {**out, "scales": [self.stats, *scale], "factors": [self.basis, self.mean]}

    def to(self, device: torch.device) -> "TransformStore":
        """This store on ``device`` (itself when it is there)."""
        if self.mean.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TransformStore(self.widths, [move(c) for c in self.codes], move(self.stats), move(self.basis),
                              move(self.basis_scale), move(self.mean), self.tokens, self.features, self.block,
                              self.path, self.allocation, move(self.rows), self.calibration, self.owns_mean)


def calibration_store(mean: Tensor, basis: Tensor, features: int, basis_dtype: str) -> TransformStore:
    """A calibrated group's basis as a store that coded segments share: mean (G·F,) and basis (G·F, r)
    float32 (``kvsvd.calibrate``) held as mean (1, 1, G·F) bf16 and rows (1, r, G·F) in ``basis_dtype``."""
    vh = basis.mT.float().unsqueeze(0)
    if basis_dtype in BASIS_BITS:
        rows, scale = quantize_rows(vh, BASIS_BITS[basis_dtype])
    else:
        rows, scale = vh.to(torch.bfloat16), None
    return TransformStore((), [], vh.new_zeros(1, 0, 0, 2, dtype=torch.bfloat16), rows, scale,
                          mean.reshape(1, 1, -1).to(torch.bfloat16), 0, features, 0,
                          f"calibrated basis {basis_dtype}", {}, calibration=True)


def encode(lt: Latents, choice: Tensor, config) -> TransformStore:
    """The store of one matrix with ``choice`` (r,) indices into the quantiser's CODES."""
    tc = config.params
    table = CODES[tc.quantiser]
    bits = torch.tensor([code.bits for code in table], dtype=torch.float64)[choice]
    order = torch.argsort(-bits, stable=True)[:int((bits > 0).sum())]   # kept columns, widest first
    widths, codes, stats = [], [], []
    B, T = lt.c.shape[:2]
    for i, cols in zip(*(t.tolist() for t in torch.unique_consecutive(choice[order], return_counts=True))):
        code, cols = table[i], order[sum(n for _, n in widths):][:cols]
        widths.append((code, len(cols)))
        stats.append((lt.stats8 if code.bits == 8 else lt.stats)[:, :, cols])
        q = code.quantize(lt.c[..., cols], stats[-1], tc.block_tokens)
        codes.append(pack_bits(q.reshape(B, -1), code.index_bits))
    rows = None
    if lt.shared is not None:  # the earlier store's rows, named by index
        basis, basis_scale, rows = lt.shared.basis, lt.shared.basis_scale, order.to(torch.int16)
    elif tc.basis_dtype in BASIS_BITS:
        basis, basis_scale = quantize_rows(lt.vh[:, order].float(), BASIS_BITS[tc.basis_dtype])
    else:
        basis, basis_scale = lt.vh[:, order].to(torch.bfloat16), None
    G_F = lt.x.shape[-1]
    counts = {f"{code.bits:g}": int((choice == i).sum()) for i, code in enumerate(table)}
    predicted = float(lt.distortion.gather(1, choice[:, None]).sum()) / float(lt.x.square().sum())
    stats = torch.cat(stats, 2) if stats else lt.stats[:, :, :0].clone()
    store = TransformStore(tuple(widths), codes, stats, basis, basis_scale, lt.mean, T,
                           G_F // len(lt.layers), tc.block_tokens, lt.path, {}, rows,
                           owns_mean=rows is not None and lt.owns_mean)
    sample = slice(None, None, MEASURE_EVERY)  # the measured error, on every 8th token
    rebuilt = store.coefficients()[:, sample] @ store.basis_rows(slice(None)) + lt.mean.float()
    x = lt.x[:, sample]
    store.allocation = {"kind": lt.kind, "layers": lt.layers, "bits": counts, "kept": len(order),
                        "bits_per_entry": sum(code.bits * n for code, n in widths) / G_F,
                        "predicted_error": predicted,
                        "measured_error": float((rebuilt - x).square().sum() / x.square().sum())}
    return store


def compress(matrices: list[tuple[Tensor, int, str, list[int], "TransformStore | None"]], config, budget: float,
             timer: StageTimer | None = None, weights: list[Tensor] | None = None) -> tuple[list[TransformStore], float]:
    """Transform-code ``matrices`` ((x (B, T, G, F), max rank, "k"|"v", layers, shared store or None), ...)
    together in ``budget`` bytes: one allocation over all of them, each matrix's column errors weighted by its
    feature ``weights`` (G·F,) where given (:func:`analyse`). Returns the stores and λ."""
    weights = weights or [None] * len(matrices)
    latents = [analyse(x, rank, config, kind=kind, layers=layers, timer=timer, shared=shared, weight=w)
               for (x, rank, kind, layers, shared), w in zip(matrices, weights)]
    dev = matrices[0][0].device
    with maybe_stage(timer, "allocation", dev):
        choices, lam = allocate(latents, budget, config)
    with maybe_stage(timer, "encoding", dev):
        stores = [encode(lt, ch, config) for lt, ch in zip(latents, choices)]
    return stores, lam


def uses_calibration(settings: TransformConfig | dict) -> bool:
    """Whether transform settings (a TransformConfig, or a grid entry's keys) read a calibration file."""
    get = settings.get if isinstance(settings, dict) else lambda name: getattr(settings, name)
    return get("basis") == "calibrated" or get("weighting") == "output"


@dataclass
class Calibrated:
    """What a transform cache holds once per model from its calibration file: the calibrated basis stores and
    the feature weights, by (first layer of the group, kind)."""
    stores: dict[tuple[int, str], TransformStore] = field(default_factory=dict)
    weights: dict[tuple[int, str], Tensor] = field(default_factory=dict)


def default_basis(ratio: float, fields: dict) -> str:
    """The basis :meth:`Transform.for_ratio` picks when ``fields`` name none: the calibrated one from
    :data:`LOW_RATE_FROM` for pre-RoPE keys (where the frontier grid scored it ahead; a calibration holds
    pre-RoPE keys) or wherever the fields read a calibration (``calibration_path``, ``weighting="output"``);
    else each prompt's own."""
    from ..config import CompressionConfig
    low_rate = low_rate_ratio(ratio) and fields.get("key_space", CompressionConfig.key_space) == "pre_rope"
    return "calibrated" if low_rate or fields.get("calibration_path") or uses_calibration(fields) else "prompt"


def low_rate_ratio(ratio: Any, low: float = LOW_RATE_FROM) -> bool:
    """Whether ``ratio`` (a number, or a grid entry's unexpanded value) is at or above ``low``."""
    return isinstance(ratio, (int, float)) and ratio >= low


def default_window(ratio: float, dense_share: float = 0.0) -> dict[str, int]:
    """The default dense window and new-block size: :data:`TINY_WINDOW` from :data:`TINY_WINDOW_FROM`;
    :data:`SMALL_WINDOW` from :data:`LOW_RATE_FROM`, or where the large window's dense parts would hold
    ``dense_share`` > :data:`DENSE_SHARE` of the budget; else :data:`LARGE_WINDOW` (see :meth:`Transform.for_ratio`)."""
    if low_rate_ratio(ratio, TINY_WINDOW_FROM):
        return dict(TINY_WINDOW)
    return dict(SMALL_WINDOW if low_rate_ratio(ratio) or dense_share > DENSE_SHARE else LARGE_WINDOW)


@dataclass(frozen=True)
class Transform(Method):
    """Transform coding of xKV groups: every group's prefill coded in one allocation over the cache's budget."""

    def check(self, config: CompressionConfig) -> None:
        super().check(config)
        if uses_calibration(config.params) and config.key_space != "pre_rope":
            raise ValueError(f"key_space={config.key_space!r} does not fit a calibrated basis or weighting (`kvsvd "
                             "calibrate` fits pre-RoPE keys); accepted: key_space='pre_rope'")

    def grid_keys(self) -> set[str]:
        """The common config fields and its TransformConfig's, ``ratio`` among them (the grid's timeline budget
        sets ``reserve_tokens``)."""
        return {*COMMON_FIELDS, *self.param_names()} - {"reserve_tokens"}

    def for_ratio(self, ratio: float, tokens: int, model_config, group_size: int, reserve_tokens: int,
                  k_share: float, fields: dict) -> dict:
        """The ratio goes to the allocator; the basis may use every latent column (rank G·F) unless rank_k /
        rank_v cap it. Defaults (each from the frontier grid, SmolLM2 at 2048 tokens, needle tasks): every
        layer coded (a hybrid model's sliding-window layers in groups of their own; the last group of each kind
        holds the remainder), 4 sink tokens, blocks of 256 tokens per coefficient
        scale; below 8× a 32-token window and new blocks of 512, from 8× an 8-token window and new blocks of 32
        (the question and the answer are then coded as they arrive), from 16× a 4-token window and new blocks
        of 16 (:data:`TINY_WINDOW`), and below 8× the 8-token window too where the large window's
        dense parts would hold more than 40% of the budget (:data:`DENSE_SHARE`: a short context, or a hybrid
        model's few sliding-window tokens); each prompt's own basis below 8×, the
        calibrated one from 8× or where a calibration is read (:func:`default_basis`), from ``calibration_path``
        or else the model's default file (``kvsvd.calibrate.default_path``; refused, with the command that
        writes it, when missing). Refuses a ratio whose budget the dense parts (sinks, window,
        uncompressed layers, reserved tokens) fill on their own, naming the highest it can reach."""
        from ..calibrate import default_path
        from ..config import CompressionConfig
        sink_tokens = fields.get("sink_tokens", TransformConfig.sink_tokens)
        groups = ModelShape.of(model_config).layer_groups(group_size, fields["start_layer"], sliding=self.codes_windows)

        def dense_parts(window: dict) -> tuple[float, float]:
            """The dense parts' bytes with ``window`` and the budget, at the tokens the cache budgets."""
            reserve = min(reserve_tokens, window["block_size"])  # as the cache budgets it (:meth:`code`)
            fixed = dense_bytes(model_config, tokens + reserve, [l for g in groups for l in g],
                                window["residual_length"] + sink_tokens + reserve,
                                fields.get("dense_dtype", CompressionConfig.dense_dtype))
            return fixed, accounting.dense16_bytes(model_config, tokens + reserve) / ratio

        named = {k: fields[k] for k in LARGE_WINDOW if k in fields}
        fixed, budget = dense_parts({**LARGE_WINDOW, **named})
        fields = {**default_window(ratio, fixed / budget), **fields}
        fixed, budget = dense_parts(fields)
        fields.setdefault("basis", default_basis(ratio, fields))
        fields.update(ratio=ratio, reserve_tokens=reserve_tokens)
        if fixed >= budget:
            raise ValueError(f"ratio={ratio} is out of reach at {tokens + min(reserve_tokens, fields['block_size'])} "
                             "tokens: the sinks, residual window, uncompressed layers and reserved tokens alone hold "
                             f"{fixed:.0f} of the {budget:.0f} bytes it allows; accepted: ratio < "
                             f"{budget * ratio / fixed:.2f}, or fewer sink_tokens / residual_length")
        if uses_calibration(fields) and not fields.get("calibration_path"):
            path = default_path(model_config, group_size, fields["start_layer"])
            if not path.is_file():
                weighting = fields.get("weighting", TransformConfig.weighting)
                raise FileNotFoundError(
                    f"basis={fields['basis']!r}, weighting={weighting!r} reads the model's "
                    f"calibration (the default basis from {LOW_RATE_FROM}x is the calibrated one), and {path} does "
                    f"not exist; accepted: write it with `python -m kvsvd calibrate MODEL --layer-group-size "
                    f"{group_size} --start-layer {fields['start_layer']}`, pass calibration_path, or basis='prompt'")
            fields["calibration_path"] = str(path)
        return {"layer_group_size": group_size, **fields}

    def prepare(self, cache: LowRankCache, groups: list[list[int]]) -> Calibrated:
        """What the cache holds once per model: the calibrated basis of each group (by first layer) and kind
        (batch 1), and with ``weighting="output"`` each one's feature weights."""
        from ..calibrate import Calibration
        tc = cache.config.params
        state = Calibrated()
        if not uses_calibration(tc):
            return state
        widest = max(len(g) for g in groups) * cache.shape.features
        calibration = Calibration.load(tc.calibration_path, cache.model_config, tc.rank("k", widest),
                                       tc.rank("v", widest), groups, weights=tc.weighting == "output")
        for group in groups:
            for kind in "kv":
                if tc.basis == "calibrated":
                    mean, rows = calibration.basis(group[0], kind)
                    rank = tc.rank(kind, len(group) * cache.shape.features)
                    state.stores[group[0], kind] = calibration_store(mean, rows[:, :rank], cache.shape.features,
                                                                     tc.basis_dtype)
                if tc.weighting == "output":
                    state.weights[group[0], kind] = calibration.weight(group[0], kind)
        return state

    def held_once(self, state: Calibrated) -> list[Tensor]:
        return [t for store in state.stores.values() for t in store.held()["calibration"]] + list(state.weights.values())

    def code(self, cache: LowRankCache, jobs: list[tuple[LayerGroup, int]], whole_cache: bool) -> None:
        """Transform-code the n oldest residual tokens of each (group, n) in one allocation. The first
        ``sink_tokens`` of the timeline become dense segments. ``whole_cache``: the budget is what leaves the
        whole cache at 1/ratio of its 16-bit bytes (every other tensor held counted as it is); otherwise
        1/ratio of these tokens', coded on the basis of the group's first coded segment."""
        cfg, tc = cache.config, cache.config.params
        live = [layer for layer in cache.layers if layer.is_initialized]
        tokens = max((layer.get_seq_length() for layer in live), default=0)
        matrices, weights, owners = [], [], []
        for group, n in jobs:
            sinks = min(n, max(0, tc.sink_tokens - group.compressed_length))
            if sinks:
                k, v = group.take_oldest(sinks)
                group.add_segment(sinks, DenseStore.build(k, cfg.dense_dtype), DenseStore.build(v, cfg.dense_dtype))
            if n > sinks:
                k, v = group.take_oldest(n - sinks)
                features = len(group.layers) * cache.shape.features
                matrices += [(x, tc.rank(kind, features), kind, group.layers,
                              self._shared_basis(cache, group, kind, whole_cache, x.device))
                             for x, kind in ((k, "k"), (v, "v"))]
                weights += [cache.calibration.weights.get((group.layers[0], kind)) for kind in "kv"]
                owners.append((group, n - sinks))
        if not owners:
            return
        if whole_cache:  # the reserved tokens to come: up to block_size wait dense in every layer, the rest are
            # coded in blocks at 1/ratio of their 16-bit bytes, in every coded layer (a sliding one too, though a
            # 16-bit cache's sliding layer holds no more once its window is full); the ratio is met at the end
            reserve = min(tc.reserve_tokens, cfg.block_size)
            coded = [layer for g in cache.groups for layer in g.layers]
            end = tokens + tc.reserve_tokens
            grown = (dense_bytes(cache.model_config, end, coded, reserve, cfg.dense_dtype)
                     - dense_bytes(cache.model_config, tokens, coded, 0, cfg.dense_dtype)
                     + (tc.reserve_tokens - reserve) * len(coded) * 2 * cache.shape.features
                     * accounting.DENSE_ENTRY_BYTES / tc.ratio)
            dense16 = accounting.dense16_bytes(cache.model_config, end, live[0].batch)
            held = accounting.report(cache.held_tensors(), dense16)["total_bytes"] + live[0].batch * grown
            budget = dense16 / tc.ratio - held
            if budget <= 0:
                raise ValueError(f"ratio={tc.ratio} is out of reach: the sinks, residual windows, RoPE positions, "
                                 f"uncompressed layers and reserved tokens alone hold {held:.0f} of the "
                                 f"{dense16 / tc.ratio:.0f} bytes it allows at {end} tokens; accepted: ratio < "
                                 f"{dense16 / held:.2f}, or fewer sink_tokens / residual_length")
        else:
            budget = sum(x.numel() * accounting.DENSE_ENTRY_BYTES for x, *_ in matrices) / tc.ratio
        timer = StageTimer()
        t0 = time.perf_counter()
        stores, lam = compress(matrices, cfg, budget, timer, weights)
        if matrices[0][0].device.type == "cuda":
            torch.cuda.synchronize()
        cache.compression_log.append({"layers": [l for g, _ in owners for l in g.layers],
                                      "tokens": sum(n for _, n in owners), "ms": (time.perf_counter() - t0) * 1e3,
                                      "breakdown_ms": timer.breakdown_ms(), "paths": [s.path for s in stores],
                                      "budget_bytes": budget, "lambda": lam,
                                      "allocation": [s.allocation for s in stores]})
        for i, (group, n) in enumerate(owners):
            group.add_segment(n, stores[2 * i], stores[2 * i + 1])

    @staticmethod
    def _shared_basis(cache: LowRankCache, group: LayerGroup, kind: str, prefill: bool,
                      device: torch.device) -> TransformStore | None:
        """The store whose basis and mean a new segment of ``group`` is coded on: the calibrated one (with
        ``mean="prompt"``, a later block takes the group's first coded segment's mean), else (a later block) the
        group's first coded segment's; None: the segment fits a basis of its own."""
        stores = cache.calibration.stores
        own_mean = bool(stores) and cache.config.params.mean == "prompt"
        first = None
        if own_mean or not (stores or prefill):  # a later block reads the group's first coded segment
            seg = next((seg for seg in group.retained + group.segments if isinstance(seg.keys, TransformStore)), None)
            first = None if seg is None else (seg.keys if kind == "k" else seg.values)
        if stores:
            key = group.layers[0], kind
            stores[key] = stores[key].to(device)
            return stores[key] if first is None else replace(stores[key], mean=first.mean, calibration=False)
        return first

    def kept_when_dropped(self, store: Any) -> TransformStore | None:
        """A per-prompt basis (or a prompt's own mean on a calibrated basis) that later blocks are coded on stays
        held, without the codes, once its own tokens have left a sliding window."""
        if not isinstance(store, TransformStore) or store.calibration or (store.rows is not None and not store.owns_mean):
            return None
        return TransformStore((), [], store.stats[:, :0].clone(), store.basis, store.basis_scale, store.mean, 0,
                              store.features, store.block, store.path, {}, None if store.rows is None else store.rows[:0],
                              owns_mean=store.owns_mean)

    @staticmethod
    def basis_of(spec: dict) -> str:
        """The basis a grid entry runs: the one it names, else the one :meth:`for_ratio` picks
        (:func:`default_basis`)."""
        return spec.get("basis") or default_basis(spec.get("ratio"), spec)

    def runs_svd(self, spec: dict) -> bool:
        return self.basis_of(spec) != "calibrated"

    def reads_calibration(self, spec: dict) -> bool:
        return uses_calibration({**spec, "basis": self.basis_of(spec)})

    def label_parts(self, spec: dict, field: Callable[[str], Any]) -> list[str]:
        from ..config import CompressionConfig

        window = {k: int(spec[k]) if present(spec.get(k)) else v for k, v in default_window(spec.get("ratio")).items()}
        basis = "calibrated basis" if self.basis_of(spec) == "calibrated" else "basis"
        parts = [field("key_space"), f"{basis} {field('basis_dtype')}", f"sinks {int(field('sink_tokens'))}",
                 f"window {window['residual_length']}"]
        if window["block_size"] != CompressionConfig.block_size:
            parts.append(f"new blocks {window['block_size']}")
        if field("block_tokens") != TransformConfig.block_tokens:
            parts.append(f"block {int(field('block_tokens'))}")
        if field("value_weight") != TransformConfig.value_weight:
            parts.append(f"V weight {field('value_weight'):g}")
        if field("block_scale") != TransformConfig.block_scale:
            parts.append(f"{field('block_scale')}-scaled blocks")
        if self.basis_of(spec) == "calibrated" and field("mean") == "prompt":
            parts.append("prompt mean")
        if field("weighting") != TransformConfig.weighting:
            parts.append(f"{field('weighting')}-weighted")
        if field("quantiser") != TransformConfig.quantiser:
            parts.append(f"{field('quantiser')} codes")
        return parts


# groups of 5 layers: from the frontier grid (SmolLM2: 2.7-8x scored best with groups of 5)
TRANSFORM = Transform("transform", "kvsvd transform", group_size=5, params=TransformConfig, joint=True, ranked=False,
                      needs_ratio=True, codes_windows=True, resolved_in_label=tuple(LARGE_WINDOW))
