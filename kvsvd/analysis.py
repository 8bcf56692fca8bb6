"""KV-cache analysis behind notebooks 01 (spectra) and 03 (compressibility).

A :class:`KVSample` holds one prefill's pre-RoPE queries, keys and values per layer, with
the model's RoPE cos/sin, so that post-RoPE keys and attention outputs can be formed
exactly. Every function returns plain tensors or tidy pandas DataFrames that the notebooks
save (CSV/JSON) and the figures in :mod:`kvsvd.figures` redraw.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import accounting
from .accounting import DENSE_ENTRY_BYTES, factor_entry_bytes
from .config import CompressionConfig
from .rope import apply_rope

Tensor = torch.Tensor
KINDS = ("k_pre", "k_post", "v")  # pre-RoPE keys, post-RoPE keys, values
KIND_LABELS = {"k_pre": "K pre-RoPE", "k_post": "K post-RoPE", "v": "V"}


@dataclass
class KVSample:
    """One prefill: per layer q (T, Hq·d), k and v (T, H·d), float32; cos, sin (T, d)."""
    q: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
    cos: Tensor
    sin: Tensor
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def tokens(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def rotate(self, x: Tensor) -> Tensor:
        """RoPE of (T, n·d) rows at this sample's positions, n heads of head_dim."""
        T = x.shape[0]
        h = x.reshape(1, T, -1, self.head_dim).transpose(1, 2)
        return apply_rope(h, self.cos[None, :T], self.sin[None, :T]).transpose(1, 2).reshape(T, -1)

    def matrix(self, kind: str, layer: int) -> Tensor:
        """(T, H·d) float32 for ``kind`` in :data:`KINDS`."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is unknown; accepted: {', '.join(KINDS)}")
        if kind == "k_post":
            return self.rotate(self.k[layer])
        return (self.k if kind == "k_pre" else self.v)[layer]


@torch.no_grad()
def sample_kv(model, tokenizer, tokens: int, *, offset_chars: int = 0, calibration: bool = False) -> KVSample:
    """Prefill ``tokens`` tokens of the shipped prose (starting ``offset_chars`` in), or of the calibration
    text (``kvsvd calibrate``'s, which no prompt contains), and capture q, k, v."""
    from .bench.kernels import natural_text
    from .calibrate import calibration_prose
    from .models import capture_projections
    text = calibration_prose()[offset_chars:] if calibration else natural_text(offset_chars + tokens * 8)[offset_chars:]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(model.device)
    if ids.shape[1] < tokens:
        raise ValueError(f"tokens={tokens} is out of range for the shipped prose; accepted: <= {ids.shape[1]}")
    out = capture_projections(model, ids)
    pos = torch.arange(tokens, device=ids.device)[None]
    probe = torch.zeros(1, dtype=torch.float32, device=ids.device)
    cos, sin = model.model.rotary_emb(probe, pos)
    shape = accounting.ModelShape.of(model.config)
    return KVSample(q=[x[0].cpu() for x in out["q_proj"]], k=[x[0].cpu() for x in out["k_proj"]],
                    v=[x[0].cpu() for x in out["v_proj"]], cos=cos[0].float().cpu(), sin=sin[0].float().cpu(),
                    heads=out["q_proj"][0].shape[-1] // shape.head_dim, kv_heads=shape.kv_heads,
                    head_dim=shape.head_dim)


# ----------------------------------------------------------------------------- spectra (notebook 01)

def head_spectra(x: Tensor, heads: int) -> Tensor:
    """Singular values (heads, head_dim), float64, of each head's (T, head_dim) slice of x (T, heads·d)."""
    return torch.linalg.svdvals(x.double().reshape(x.shape[0], heads, -1).transpose(0, 1))


def energy(s: Tensor) -> Tensor:
    """Cumulative fraction of ‖X‖²_F captured by the first r singular values, r = 1..len(s)."""
    e = s.double().pow(2).cumsum(-1)
    return e / e[..., -1:]


def rank_for_energy(s: Tensor, fraction: float) -> int:
    """Smallest r whose rank-r truncation keeps ``fraction`` of the energy."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} is out of range; accepted: (0, 1]")
    return int((energy(s) < fraction - 1e-12).sum()) + 1


def effective_rank(s: Tensor) -> float:
    """exp(entropy of σ_i / Σσ) (Roy & Vetterli 2007): 1 for rank one, n for a flat spectrum."""
    p = s.double() / s.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def variance_spread(x: Tensor, heads: int) -> Tensor:
    """Per head: max / min variance over its head_dim channels (the 'K 132× vs V 4×' statistic)."""
    var = x.double().reshape(x.shape[0], heads, -1).var(0)
    return var.amax(-1) / var.amin(-1).clamp_min(1e-30)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two (T, ·) representations of the same tokens (Kornblith et al. 2019), in [0, 1]."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = (y.mT @ x).pow(2).sum()
    return float(num / ((x.mT @ x).norm() * (y.mT @ y).norm()))


def token_subspace_overlap(x: Tensor, y: Tensor, rank: int) -> float:
    """Mean cos² of the principal angles between the top-``rank`` left singular (token) subspaces
    of x and y: 1 when the two layers could share xKV's token factor exactly, rank/T by chance."""
    ux = torch.linalg.svd(x.double(), full_matrices=False)[0][:, :rank]
    uy = torch.linalg.svd(y.double(), full_matrices=False)[0][:, :rank]
    return float(torch.linalg.svdvals(ux.mT @ uy).pow(2).mean())


def spectrum_tables(sample: KVSample) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stats, spectra): per kind × layer × head effective rank, ranks at 90/99% energy and
    variance spread; and the normalised singular values σ_i/σ_1 in long form."""
    stats, spectra = [], []
    for kind in KINDS:
        for layer in range(sample.num_layers):
            x = sample.matrix(kind, layer)
            s = head_spectra(x, sample.kv_heads)
            spread = variance_spread(x, sample.kv_heads)
            for h in range(sample.kv_heads):
                stats.append({"kind": kind, "layer": layer, "head": h, "effective_rank": effective_rank(s[h]),
                              "rank_90": rank_for_energy(s[h], 0.90), "rank_99": rank_for_energy(s[h], 0.99),
                              "variance_spread": float(spread[h])})
                spectra += [{"kind": kind, "layer": layer, "head": h, "index": i + 1, "sigma": float(v)}
                            for i, v in enumerate(s[h] / s[h, 0])]
    return pd.DataFrame(stats), pd.DataFrame(spectra)


def layer_similarity(sample: KVSample, kind: str, rank: int = 32) -> pd.DataFrame:
    """Long form (layer_a, layer_b, rank, cka, overlap) over all layer pairs for one kind: :func:`linear_cka`
    and :func:`token_subspace_overlap`, each layer's centring, Gram norm and token subspace computed once and
    each unordered pair once (both measures are symmetric)."""
    raw = [sample.matrix(kind, l).double() for l in range(sample.num_layers)]
    xs = [x - x.mean(0) for x in raw]
    norms = [(x.mT @ x).norm() for x in xs]
    us = [torch.linalg.svd(x, full_matrices=False)[0][:, :rank] for x in raw]
    pair = {}
    for a in range(len(xs)):
        for b in range(a, len(xs)):
            pair[a, b] = pair[b, a] = (float((xs[b].mT @ xs[a]).pow(2).sum() / (norms[a] * norms[b])),
                                       float(torch.linalg.svdvals(us[a].mT @ us[b]).pow(2).mean()))
    return pd.DataFrame([{"kind": kind, "layer_a": a, "layer_b": b, "rank": rank, "cka": pair[a, b][0],
                          "overlap": pair[a, b][1]} for a in range(len(xs)) for b in range(len(xs))])


# ----------------------------------------------------------------------- compressibility (notebook 03)

def rank_for_ratio(ratio: float, tokens: int, features: int, factor_dtype: str) -> int:
    """Largest rank whose factors (u: tokens × r, w: r × features, plus per-token scales for int8/int4)
    fit in 1/ratio of the (tokens × features) matrix in a 16-bit cache; at least 1."""
    if ratio <= 1:
        raise ValueError(f"ratio={ratio} is out of range; accepted: > 1")
    e_u, e_w, e_s = factor_entry_bytes(factor_dtype)
    dense = tokens * features * DENSE_ENTRY_BYTES
    return max(1, int((dense / ratio - tokens * e_s) // (tokens * e_u + features * e_w)))


def attention_output(q: Tensor, k: Tensor, v: Tensor, heads: int, kv_heads: int, n_queries: int) -> Tensor:
    """Causal attention of the last ``n_queries`` post-RoPE queries q (T, Hq·d) over k, v (T, H·d)
    (GQA: query head h reads kv head h // (Hq/H)) → (Hq, n_queries, d) float32."""
    T = k.shape[0]
    d = k.shape[1] // kv_heads
    qh = q[T - n_queries:].reshape(n_queries, heads, d).transpose(0, 1)           # (Hq, n, d)
    rep = heads // kv_heads
    kh = k.reshape(T, kv_heads, d).transpose(0, 1).repeat_interleave(rep, 0)        # (Hq, T, d)
    vh = v.reshape(T, kv_heads, d).transpose(0, 1).repeat_interleave(rep, 0)
    scores = qh @ kh.mT / d ** 0.5
    mask = torch.arange(T)[None, :] > torch.arange(T - n_queries, T)[:, None]
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ vh


def held_bytes(store) -> int:
    """Bytes of every tensor a compressor's store holds (factors, scales, basis, mean), a calibration
    included: ``kvsvd.accounting``."""
    rep = accounting.report(store.held(), 0)
    return int(rep["total_bytes"] + rep["calibration_bytes"])


def replaced_attention(sample: KVSample, kind: str, layer: int, x_hat: Tensor, n_queries: int = 64) -> Tensor:
    """Causal attention outputs of the last ``n_queries`` queries of ``layer`` with its ``kind``
    matrix (k_pre, k_post or v; (T, H_kv·d) float32) replaced by ``x_hat`` and the rest exact."""
    k, v = sample.matrix("k_post", layer), sample.v[layer]
    if kind == "v":
        v = x_hat
    else:
        k = x_hat if kind == "k_post" else sample.rotate(x_hat)
    return attention_output(sample.rotate(sample.q[layer]), k, v, sample.heads, sample.kv_heads, n_queries)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def compressibility(sample: KVSample, *, kinds=KINDS, groups=(1, 2, 4, 8), ratios=(2, 4, 8, 16),
                    factor_dtypes=("bf16",), layers: range | None = None, n_queries: int = 64,
                    calibration=None, n_iter: int = 2) -> pd.DataFrame:
    """Reconstruction and attention-output error of each K or V matrix compressed on its own.

    For every kind × G × target ratio × factor dtype, the layers (default: the last multiple of
    8 layers, so every G splits them into whole groups) are compressed in groups of G by the
    same compressor LowRankCache uses (``pca`` rows when a ``calibration`` is given, G=1,
    keys pre-RoPE only), the bytes are those the stores hold, and the error is measured per
    layer: ‖X̂−X‖/‖X‖ and the relative error of causal attention outputs for the last
    ``n_queries`` queries with only this matrix replaced. One row per (configuration, layer).
    A budget that affords more than full rank is met at full rank (``full_rank`` column; the
    measured ``ratio`` is then above the target).
    """
    L, T = sample.num_layers, sample.tokens
    layers = layers if layers is not None else range(L - (L // 8) * 8, L)
    F = sample.kv_heads * sample.head_dim
    dense_attn = {l: attention_output(sample.rotate(sample.q[l]), sample.matrix("k_post", l), sample.v[l],
                                      sample.heads, sample.kv_heads, n_queries) for l in layers}
    methods = [("svd" if G == 1 else "xkv", G) for G in groups] + ([("pca", 1)] if calibration is not None else [])
    cells = [(k, m, G, r, fd) for k in kinds for m, G in methods for r in ratios for fd in factor_dtypes
             if not (m == "pca" and k == "k_post")]
    rows = []
    for kind, method, G, ratio, fdt in tqdm(cells, desc="compressibility"):
        if len(layers) % G:
            raise ValueError(f"groups: G={G} does not divide the {len(layers)} analysed layers")
        # a budget that affords more than full rank is met exactly at full rank (measured ratio is higher)
        rank = min(rank_for_ratio(ratio, T, G * F, fdt), T, G * F)
        own = {"calibration_path": "in-memory"} if method == "pca" else {"n_iter": n_iter}  # pca runs no SVD
        cfg = CompressionConfig.of(method, layer_group_size=G, rank_k=rank, rank_v=rank, factor_dtype=fdt, **own)
        for g0 in range(layers.start, layers.stop, G):
            ls = list(range(g0, g0 + G))
            x = torch.stack([sample.matrix(kind, l) for l in ls], 1)[None]             # (1, T, G, F)
            store = cfg.spec.compress(x, cfg, kind=kind[0], layers=ls, heads=sample.kv_heads, calibration=calibration)
            held = held_bytes(store)  # pca: its calibrated basis and mean count too (as large as svd's w)
            for j, l in enumerate(ls):
                x_hat = store.layer(j, torch.float32)[0]
                attn = replaced_attention(sample, kind, l, x_hat, n_queries)
                rows.append({"kind": kind, "method": method, "group_size": G, "target_ratio": ratio,
                             "factor_dtype": fdt, "rank": rank, "full_rank": rank == min(T, G * F),
                             "per_layer_rank": rank / G, "layer": l,
                             "path": store.path, "bytes_held": held / G, "dense_bytes": T * F * DENSE_ENTRY_BYTES,
                             "recon_error": _rel(x_hat, x[0, :, j]), "attn_error": _rel(attn, dense_attn[l])})
    df = pd.DataFrame(rows)
    df["ratio"] = df["dense_bytes"] / df["bytes_held"]
    return df


# ------------------------------------------------------------------ rate-distortion (notebook 03)

RD_METHODS = ("truncation", "per-token int", "per-channel int", "transform, σ-scaled blocks", "transform",
              "transform, vector codes", "transform, calibrated basis", "transform, calibrated basis, prompt mean",
              "transform, calibrated basis, vector codes", "transform, the prompt's own basis uncounted",
              "transform, the prompt's own basis uncounted, vector codes", "Gaussian bound")
RD_BLOCK_SCALES = {"unclipped": "transform", "std": "transform, σ-scaled blocks"}  # the coder's block scale → method


def calibrated_store(calibration: KVSample, kind: str, group: range, basis_dtype: str = "int8"):
    """The transform coder's calibrated basis of one group (``basis_dtype`` rows, bf16 mean, as a cache holds it),
    fitted on a calibration sample as ``kvsvd calibrate`` fits it."""
    from .calibrate import principal_directions
    from .methods import transform
    X = torch.cat([calibration.matrix(kind, l) for l in group], -1).double()   # (T, G·F)
    mean, basis = principal_directions(X.sum(0), X.mT @ X, len(X))
    return transform.calibration_store(mean, basis, calibration.kv_heads * calibration.head_dim, basis_dtype)


@torch.no_grad()
def rate_distortion(sample: KVSample, *, kinds=("k_pre", "v"), group: range | None = None,
                    bits=(0.5, 1, 2, 3, 4), calibration: KVSample | None = None) -> pd.DataFrame:
    """Relative error ‖X̂−X‖/‖X‖ against bits per entry for one group of layers (default the 5 from
    the middle), K pre-RoPE and V as one (T × G·F) matrix, by these ways of spending bytes:

    - ``truncation``: the exact rank-r SVD with bf16 factors, r the largest the budget holds;
    - ``per-token int`` / ``per-channel int``: symmetric 4- and 8-bit quantisation with one bf16
      scale per token row / per feature column (``kvsvd.store.quantize_rows``);
    - ``transform``: the transform coder (``kvsvd.methods.transform``) at each budget, and
      ``transform, σ-scaled blocks`` the same with ``block_scale="std"`` (8-bit codes clip a block's
      outlying tokens); with a ``calibration`` sample (other text), ``transform, calibrated basis``: the
      coder on that text's basis and mean (held once per model, so not in the bits per entry; the int16
      index of the kept columns is), and ``transform, calibrated basis, prompt mean``: on that basis around the
      prompt's own mean (``mean="prompt"``: G·F bf16 in the bits per entry);
    - ``..., vector codes``: the same coder with ``quantiser="vector"`` (below 3 bits per entry, one codebook
      index per run of 4 or 8 tokens of a column: ``kvsvd.codebook``);
    - ``transform, the prompt's own basis uncounted``: the coder on the prompt's own principal directions and
      mean (bf16 rows) held as if they were free: an ideal that separates what the quantiser, the block
      statistics and the allocation lose from what a basis costs or misses;
    - ``Gaussian bound``: reverse water-filling over the centred covariance's eigenvalues λᵢ,
      D(θ) = Σ min(θ, λᵢ), R(θ) = Σ max(0, ½·log₂(λᵢ/θ)) bits per token: the least error any code
      can reach on Gaussian data with this spectrum (the mean taken as known).

    Bits per entry are 8 · bytes held (``kvsvd.accounting``) / (T · G·F) for every method but the bound.
    """
    from .methods import transform
    from .store import quantize_rows, dequantize_rows
    from .svd import full_svd
    L, T = sample.num_layers, sample.tokens
    group = group if group is not None else range(L // 2 - 2, L // 2 + 3)
    rows = []

    def add(kind, method, held_bytes, x_hat, x):
        rows.append({"kind": kind, "method": method, "bits_per_entry": 8 * held_bytes / x.numel(),
                     "rel_error": _rel(x_hat, x), "tokens": T, "layers": f"{group.start}-{group.stop - 1}"})

    calibrated = {kind: calibrated_store(calibration, kind, group) for kind in kinds} if calibration is not None else {}
    own = {kind: calibrated_store(sample, kind, group, "bf16") for kind in kinds}
    for kind in kinds:
        x = torch.stack([sample.matrix(kind, l) for l in group], 1)  # (T, G, F)
        X = x.reshape(T, -1)
        n = X.shape[1]
        U, S, Vh = full_svd(X, min(T, n))
        for b in bits:
            rank = int(b / 8 * T * n // (2 * (T + n)))  # bf16 token and right factors
            if rank >= 1:
                u, w = U[:, :rank].to(torch.bfloat16), (S[:rank, None] * Vh[:rank]).to(torch.bfloat16)
                add(kind, "truncation", accounting.report({"factors": [u, w]}, 0)["total_bytes"],
                    u.float() @ w.float(), X)
            coders = [(method, scale, None, "basis", "scalar") for scale, method in RD_BLOCK_SCALES.items()]
            coders += [("transform, vector codes", "unclipped", None, "basis", "vector"),
                       ("transform, the prompt's own basis uncounted", "unclipped", own[kind], "basis", "scalar"),
                       ("transform, the prompt's own basis uncounted, vector codes", "unclipped", own[kind], "basis",
                        "vector")]
            if calibration is not None:
                coders += [("transform, calibrated basis", "unclipped", calibrated[kind], "basis", "scalar"),
                           ("transform, calibrated basis, prompt mean", "unclipped", calibrated[kind], "prompt", "scalar"),
                           ("transform, calibrated basis, vector codes", "unclipped", calibrated[kind], "basis", "vector")]
            for method, scale, shared, mean, quantiser in coders:
                cfg = CompressionConfig(method="transform", layer_group_size=len(group), params=transform.TransformConfig(
                    ratio=16 / b, sink_tokens=0, block_scale=scale, mean=mean, quantiser=quantiser))
                (store,), _ = transform.compress([(x[None], n, kind[0], list(group), shared)], cfg, b / 8 * T * n)
                rebuilt = torch.cat([store.layer(j, torch.float32)[0] for j in range(len(group))], -1)
                add(kind, method, accounting.report(store.held(), 0)["total_bytes"], rebuilt, X)
        for qbits in (4, 8):
            for method, M in (("per-token int", X), ("per-channel int", X.mT)):
                q, scale = quantize_rows(M, qbits)
                m_hat = dequantize_rows(q, scale, qbits, M.shape[-1], torch.float32)
                add(kind, method, accounting.report({"codes": [q], "scales": [scale]}, 0)["total_bytes"],
                    m_hat if method == "per-token int" else m_hat.mT, X)
        Xc = X - X.mean(0)
        lam = torch.linalg.eigvalsh(Xc.double().mT @ Xc.double()).clamp_min(0) / T
        for theta in torch.logspace(float(lam.max().log10()) - 6, float(lam.max().log10()), 60, dtype=torch.float64):
            rate = (0.5 * torch.log2(lam / theta)).clamp_min(0).sum() / n
            dist = torch.minimum(lam, theta).sum() * T
            rows.append({"kind": kind, "method": "Gaussian bound", "bits_per_entry": float(rate),
                         "rel_error": float((dist / X.double().square().sum()).sqrt()), "tokens": T,
                         "layers": f"{group.start}-{group.stop - 1}"})
    return pd.DataFrame(rows)


def _present(*tensors: Tensor | None) -> list[Tensor]:
    return [t for t in tensors if t is not None]


def basis_by_context(model, tokenizer, lengths: tuple[int, ...], *, bits=(1, 2, 3), calib_tokens: int = 2048,
                     kinds=("k_pre", "v"), group: range | None = None) -> pd.DataFrame:
    """The transform coder's basis fitted per prompt or calibrated once, as a function of context
    length: relative error ‖X̂−X‖/‖X‖ against the bits per entry a prompt holds, for one group of
    layers (default the 5 middle ones), K pre-RoPE and V each as one (T × G·F) matrix, at a budget
    of ``bits`` per entry for every prompt of ``lengths`` tokens (the shipped prose from its start).

    - ``per prompt``: mean and basis (int8 rows of the kept columns) fitted on the prompt and held
      in its bytes (``basis_bytes``);
    - ``calibrated``: mean and basis (int8, every direction the calibration text has) fitted once
      on ``calib_tokens`` tokens of the calibration text (``kvsvd calibrate``'s):
      held once per model (``calibration_bytes``), not in a prompt's bytes; a prompt holds its
      codes, their block statistics and the int16 index of its kept rows.
    """
    from .methods import transform
    calib = sample_kv(model, tokenizer, calib_tokens, calibration=True)
    L, F = calib.num_layers, calib.kv_heads * calib.head_dim
    group = group if group is not None else range(L // 2 - 2, L // 2 + 3)
    layers, n = list(group), len(group) * F

    # compress() spends the budget it is given; the config's ratio (for a cache) plays no part
    cfg = CompressionConfig(method="transform", layer_group_size=len(group),
                            params=transform.TransformConfig(ratio=2, sink_tokens=0))

    def matrix(sample: KVSample, kind: str) -> Tensor:
        return torch.stack([sample.matrix(kind, l) for l in group], 1)[None]      # (1, T, G, F)

    calibrated = {kind: calibrated_store(calib, kind, group) for kind in kinds}
    calibration_bytes = {kind: accounting.report(s.held(), 0)["calibration_bytes"] for kind, s in calibrated.items()}
    rows = []
    for T in tqdm(lengths, desc="basis by context"):
        sample = sample_kv(model, tokenizer, T)
        for kind in kinds:
            x = matrix(sample, kind)
            cal = calibrated[kind]
            for b in bits:
                for basis, shared in (("per prompt", None), ("calibrated", cal)):
                    (store,), _ = transform.compress([(x, n, kind[0], layers, shared)], cfg, b / 8 * T * n)
                    held = store.held()  # a calibrated store's: codes, block statistics, the index of its kept rows
                    rebuilt = torch.cat([store.layer(j, torch.float32) for j in range(len(group))], -1)
                    rows.append({"kind": kind, "basis": basis, "tokens": T, "target_bits": b,
                                 "bits_per_entry": 8 * accounting.report(held, 0)["total_bytes"] / (T * n),
                                 "rel_error": _rel(rebuilt[0], x.reshape(T, n)), "kept": store.allocation["kept"],
                                 "basis_bytes": 0 if shared is not None else accounting.report(
                                     {"factors": [store.basis], "scales": _present(store.basis_scale)}, 0)["total_bytes"],
                                 "calibration_bytes": calibration_bytes[kind] if shared is not None else 0,
                                 "calib_tokens": calib_tokens, "layers": f"{group.start}-{group.stop - 1}"})
    return pd.DataFrame(rows)


def at_budget(df: pd.DataFrame, bits_per_entry: float) -> pd.DataFrame:
    """Per kind and method of :func:`rate_distortion`, the least error within ``bits_per_entry``."""
    within = df[df["bits_per_entry"] <= bits_per_entry * 1.001]
    best = within.loc[within.groupby(["kind", "method"])["rel_error"].idxmin()]
    return best.pivot(index="method", columns="kind", values="rel_error").reindex(list(RD_METHODS))


# ----------------------------------------------------------------------- kernel stability (notebook 02)

def conditioned_matrix(m: int, n: int, kappa: float, seed: int = 0) -> Tensor:
    """(m, n) float64 with singular values geometrically spaced from 1 to 1/kappa, Haar vectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), n, dtype=torch.float64)
    return (U * s) @ V.mT


def orthogonality_vs_kappa(methods, kappas=(1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e8), dtypes=("fp32", "bf16"),
                           m: int = 4096, n: int = 64, seed: int = 0) -> pd.DataFrame:
    """‖QᵀQ − I‖_max of each orthonormaliser (``kvsvd.orth`` names) on X with condition number κ.

    ``dtype`` is the precision X arrives in (bf16: the block a BF16 GEMM produced, rounded to
    BF16, then handed over in FP32 as rsvd does). A Cholesky breakdown or a non-finite Q is
    recorded as ``failed`` with ``orth_error`` = inf, never dropped."""
    from .orth import CholeskyBreakdown, orthonormalise
    rows = []
    for kappa in kappas:
        A = conditioned_matrix(m, n, kappa, seed)
        for dt in dtypes:
            X = (A.to(torch.bfloat16) if dt == "bf16" else A).float()[None]
            for method in methods:
                try:
                    Q = orthonormalise(X.clone(), method)[0][0].double()
                    err = float((Q.mT @ Q - torch.eye(n, dtype=torch.float64)).abs().max())
                    failed = not torch.isfinite(Q).all().item()
                except (CholeskyBreakdown, torch.linalg.LinAlgError):
                    err, failed = float("inf"), True
                rows.append({"method": method, "kappa": kappa, "dtype": dt,
                             "orth_error": float("inf") if failed else err, "failed": failed})
    return pd.DataFrame(rows)
