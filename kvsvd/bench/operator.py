"""One decode step of attention where the cache dominates: dense 16-bit SDPA against attention from
transform codes, side by side in one run (``python -m kvsvd bench operator``).

Shape: Llama-3.1-8B's attention (32 query heads, 8 KV heads × 128), one sequence, one query token,
``tokens`` of context. K and V are synthetic with SmolLM2's measured spectra: per KV head
x_h = Z·diag(σ)·Q_h, Z standard normal (T × 128), Q_h a random orthogonal 128 × 128 and σ the median,
over SmolLM2's layers and heads, of its normalised per-head singular values (``spectra.csv`` of notebook
01: ``k_post`` for keys, ``v`` for values), stretched from 64 to 128 indices by linear interpolation.
The query is a random unit-variance vector per head, scaled by 1/√d.

Paths at each length (the same q, K, V):

- ``dense SDPA``: ``torch.nn.functional.scaled_dot_product_attention`` over bf16 K and V (``enable_gqa``);
- ``dense grouped matmul``: the same attention as two bf16 matmuls per KV head (its 4 query heads at once)
  around an FP32 softmax; ``dense FP32 grouped matmul`` the same over K and V held in FP32 (twice the
  bytes: PyTorch's CPU matmuls are much faster in FP32 than in bf16 at these shapes). Speed-ups are
  against the fastest dense path;
- ``codes``: K and V transform coded together (per-prompt basis, one allocation, ``kvsvd.methods.transform``)
  at each ratio of their 16-bit bytes and attended from their latent forms (``kvsvd.attention.attend``):
  scores q·Wᵀ then against Ĉ (post-RoPE keys), values p·Ĉ then W;
- ``codes, keys rebuilt``: the same stores, keys rebuilt from their codes each step (what pre-RoPE keys
  need before their rotation; the rotation itself is not timed), values from the latent form.

Reported per path: median ms per step over ``repeats`` steps; bytes read per step, as held (dense: K
and V in bf16; codes: codes, block statistics, basis rows and means, ``kvsvd.accounting``), which is
what a fused kernel reads (the PyTorch path also writes and reads the unpacked codes in float32, each
block's quantiser folded into the query and softmax sides, and its time includes that); the roofline
time, bytes ÷ the machine's read bandwidth measured in the same run (``torch.sum`` over a 512 MiB
float32 tensor); and the attention output's relative error against
FP32 attention over the uncoded K and V. Writes ``results/operator/cpu.json``.
"""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import accounting
from ..attention import attend
from ..config import CompressionConfig
from ..methods import transform
from . import load_or_measure

Tensor = torch.Tensor
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B


def measured_spectrum(spectra_csv: str | Path, kind: str, n: int = HEAD_DIM) -> Tensor:
    """Median over SmolLM2's layers and heads of the normalised singular values of ``kind`` (k_post, v),
    stretched to ``n`` indices: (n,) float32, decreasing, first entry 1."""
    path = Path(spectra_csv)
    if not path.exists():
        raise FileNotFoundError(f"spectra_csv={str(path)!r} does not exist; it is written by notebook 01 "
                                "(`make reproduce`), a table of kind, layer, head, index, sigma")
    by_head: dict[tuple[str, str], list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["kind"] == kind:
                by_head.setdefault((row["layer"], row["head"]), []).append((int(row["index"]), float(row["sigma"])))
    if not by_head:
        raise ValueError(f"kind={kind!r} has no rows in {path}; accepted: the kinds it holds (k_post, v)")
    curves = torch.tensor([[s for _, s in sorted(v)] for v in by_head.values()])      # (heads, 64)
    median = curves.median(0).values
    grid = torch.linspace(0, median.numel() - 1, n)
    lo = grid.floor().long().clamp(max=median.numel() - 2)
    return torch.lerp(median[lo], median[lo + 1], grid - lo)


def synthetic_kv(tokens: int, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """(1, T, KV_HEADS·HEAD_DIM) float32: per head Z·diag(σ)·Q_h."""
    heads = []
    for _ in range(KV_HEADS):
        q_h = torch.linalg.qr(torch.randn(HEAD_DIM, HEAD_DIM, generator=generator))[0]
        heads.append((torch.randn(tokens, HEAD_DIM, generator=generator) * sigma) @ q_h)
    return torch.cat(heads, -1)[None]


def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of ``torch.sum`` over a 512 MiB float32 tensor (the best of ``repeats``)."""
    x = torch.ones(128 << 20)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def _median_ms(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def run_length(tokens: int, ratios=(4.0, 8.0, 16.0), repeats: int = 20, spectra_csv: str | Path = "",
               bandwidth: float | None = None, seed: int = 0) -> dict:
    """Every path at one context length; returns its rows."""
    gen = torch.Generator().manual_seed(seed)
    bandwidth = bandwidth or read_bandwidth()
    k = synthetic_kv(tokens, measured_spectrum(spectra_csv, "k_post"), gen)
    v = synthetic_kv(tokens, measured_spectrum(spectra_csv, "v"), gen)
    q = torch.randn(1, KV_HEADS, Q_HEADS // KV_HEADS, 1, HEAD_DIM, generator=gen) * HEAD_DIM ** -0.5
    heads = lambda x: x.unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)  # noqa: E731  (1, H, T, d)
    reference = attend(q, heads(k), heads(v), None)[0]                       # FP32 over the uncoded K, V
    q16, k16, v16 = q.to(torch.bfloat16), heads(k).to(torch.bfloat16), heads(v).to(torch.bfloat16)

    def sdpa() -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q16.flatten(1, 2), k16, v16, scale=1.0,
                                                                enable_gqa=True).unflatten(1, (KV_HEADS, -1))

    def grouped(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # per KV head its 4 query heads at once
        p = torch.softmax((q.squeeze(3) @ k.mT).float(), -1)                     # (1, H, 4, T)
        return (p.to(v.dtype) @ v).unsqueeze(3)

    k32, v32 = heads(k).contiguous(), heads(v).contiguous()
    dense_bytes = 2 * tokens * KV_HEADS * HEAD_DIM * accounting.DENSE_ENTRY_BYTES  # K and V in bf16
    rows = [{"tokens": tokens, "path": path, "ratio": 1.0 / scale, "bytes_per_step": dense_bytes * scale,
             "ms_per_step": _median_ms(step, repeats), "roofline_ms": dense_bytes * scale / bandwidth / 1e6,
             "rel_error": _rel(step(), reference)}
            for path, scale, step in (("dense SDPA", 1, sdpa), ("dense grouped matmul", 1, lambda: grouped(q16, k16, v16)),
                                      ("dense FP32 grouped matmul", 2, lambda: grouped(q, k32, v32)))]
    F = KV_HEADS * HEAD_DIM
    for ratio in ratios:
        cfg = CompressionConfig(method="transform", layer_group_size=1, params=transform.TransformConfig(ratio=ratio))
        (sk, sv), _ = transform.compress([(k[:, :, None], F, "k", [0], None), (v[:, :, None], F, "v", [0], None)],
                                         cfg, dense_bytes / ratio)
        held_tensors: dict[str, list[Tensor]] = {}
        for store in (sk, sv):
            for kind, ts in store.held().items():
                held_tensors.setdefault(kind, []).extend(ts)
        held = accounting.report(held_tensors, dense_bytes)["total_bytes"]

        def latent(sk=sk, sv=sv) -> Tensor:
            return attend(q, sk.latent(0, KV_HEADS), sv.latent(0, KV_HEADS), None)[0]

        def keys_rebuilt(sk=sk, sv=sv) -> Tensor:
            return attend(q, heads(sk.layer(0, torch.float32)), sv.latent(0, KV_HEADS), None)[0]

        for path, step in (("codes", latent), ("codes, keys rebuilt", keys_rebuilt)):
            rows.append({"tokens": tokens, "path": path, "ratio": dense_bytes / held, "target_ratio": ratio,
                         "bytes_per_step": held, "ms_per_step": _median_ms(step, repeats),
                         "roofline_ms": held / bandwidth / 1e6, "rel_error": _rel(step(), reference),
                         "bits_per_entry": [s.allocation["bits_per_entry"] for s in (sk, sv)],
                         "kept_columns": [s.allocation["kept"] for s in (sk, sv)]})
    fastest = min(row["ms_per_step"] for row in rows if row["path"].startswith("dense"))
    for row in rows:
        row["speedup_vs_dense"] = fastest / row["ms_per_step"]
    return {"bandwidth_gb_s": bandwidth, "rows": rows}


def run(context_lengths=(8192, 32768, 65536), ratios=(4.0, 8.0, 16.0), repeats: int = 20,
        spectra_csv: str | Path = "results/analysis/spectra.csv", out: str | Path = "results/operator",
        force: bool = False) -> dict:
    """Every length (``<out>/cpu.json``; an existing file is returned unless ``force``)."""
    bad = [n for n in context_lengths if isinstance(n, bool) or not isinstance(n, int) or n < 256]
    if bad:
        raise ValueError(f"context_lengths {bad} are out of range; accepted: integers >= 256")

    def measure() -> dict:
        bandwidth = read_bandwidth()
        rows = []
        for n in tqdm(context_lengths, desc="operator (context lengths)"):
            rows += run_length(n, ratios, repeats, spectra_csv, bandwidth)["rows"]
        return {"shape": {"query_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1,
                          "query_tokens": 1},
                "dtypes": {"dense": "bfloat16", "codes_compute": "float32 (unpacked codes)"}, "device": "cpu",
                "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
                "bandwidth_gb_s": bandwidth, "spectra": str(spectra_csv), "rows": rows}
    return load_or_measure(Path(out) / "cpu.json", force, measure)


def table(p: dict) -> str:
    s = p["shape"]
    lines = [f"one decode step, {s['query_heads']} query / {s['kv_heads']} KV heads × {s['head_dim']}, {p['device']} "
             f"({p['threads']} threads, torch {p['torch']}), read bandwidth {p['bandwidth_gb_s']:.1f} GB/s",
             f"{'tokens':>7}  {'path':<27}{'ratio':>6}{'MB read':>9}{'ms/step':>9}{'roofline ms':>12}"
             f"{'× dense':>8}{'rel err':>9}"]
    for r in p["rows"]:
        lines.append(f"{r['tokens']:>7}  {r['path']:<27}{r['ratio']:>6.2f}{r['bytes_per_step'] / 1e6:>9.1f}"
                     f"{r['ms_per_step']:>9.2f}{r['roofline_ms']:>12.2f}{r['speedup_vs_dense']:>8.2f}"
                     f"{r['rel_error']:>9.4f}")
    return "\n".join(lines)
