"""Kernel benchmark: every SVD method on KV-shaped matrices, side by side in one run.

Writes one JSON file per configuration (matrix × rank × n_iter) with per-call ``records``
and, per method, a ``summary`` (count, total/avg/min/max ms, avg_breakdown_ms, error vs the
Eckart–Young optimum, orthogonality of U), then prints speed ratios vs ``lowrank_svd`` and
``full_svd``. A configuration whose file exists is skipped, so an interrupted run resumes.

Work that does not depend on rank or n_iter is done once per matrix: its FP64 singular values
(the Eckart–Young optimum of every rank) and the timing of ``full_svd`` (an exact SVD costs the
same at every rank; each configuration slices its error from the one full factorisation). On a
GPU at [65536, 4096] that is one exact SVD per matrix instead of one per call.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..svd import get_svd, singular_values, svd_path, truncation_error
from ..timing import StageTimer
from . import load_or_measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# methods whose work is the same at every rank and n_iter: timed once per matrix
RANK_INDEPENDENT = ("full_svd",)


@dataclass(frozen=True)
class MethodSpec:
    """``name`` is ``fn`` or ``fn[key=value,...]``, e.g. ``rsvd[qr=householder]``, ``rsvd[compute_dtype=bf16]``."""
    name: str

    def parse(self) -> tuple[str, dict]:
        fn, _, rest = self.name.partition("[")
        kwargs: dict = {}
        for item in filter(None, rest.rstrip("]").split(",")):
            key, _, value = item.partition("=")
            kwargs[key] = DTYPES[value] if key == "compute_dtype" else value
        get_svd(fn)  # validates the function name
        return fn, kwargs


@dataclass
class Profile:
    """A benchmark grid. ``matrices`` names synthetic shapes ``kv_synth:m×n`` and real ones ``smollm2``."""
    shapes: list[tuple[int, int]]
    ranks: list[int]
    n_iters: list[int]
    methods: list[str]
    dtype: str = "fp32"
    repeats: int = 5
    oversample: int = 8
    real_tokens: int = 0          # 0: no real SmolLM2 matrices
    real_groups: list[int] = field(default_factory=lambda: [1, 4, 8])
    skip_full_above: int = 1 << 62  # skip full_svd when m·n exceeds this


PROFILES = {
    "smoke": Profile(shapes=[(512, 64)], ranks=[8], n_iters=[2], repeats=2,
                     methods=["full_svd", "lowrank_svd", "rsvd", "rsvd[qr=householder]"]),
    "cpu": Profile(shapes=[(8192, 192), (8192, 768), (8192, 1536)], ranks=[32, 64, 128], n_iters=[2],
                   methods=["full_svd", "lowrank_svd", "rsvd", "rsvd[qr=gram]", "rsvd[qr=householder]",
                            "rsvd[qr=adaptive_cholqr]", "rsvd[qr=shifted_cholqr3]", "rsvd[compute_dtype=bf16]"],
                   real_tokens=4096),
    # n_iter and rank sweeps of notebook 02 (one matrix; full_svd as the rank-independent reference)
    "sweep": Profile(shapes=[(8192, 768)], ranks=[16, 32, 64, 128], n_iters=[0, 1, 2, 4],
                     methods=["full_svd", "lowrank_svd", "rsvd"]),
    "sweep_smoke": Profile(shapes=[(1024, 96)], ranks=[8, 16], n_iters=[0, 2], repeats=2,
                           methods=["full_svd", "lowrank_svd", "rsvd"]),
    "gpu": Profile(shapes=[(65536, 4096)], ranks=[256, 512], n_iters=[2, 4, 6, 8], dtype="bf16", repeats=5,
                   methods=["full_svd", "lowrank_svd", "rsvd", "rsvd[qr=shifted_cholqr3]",
                            "rsvd[qr=householder]", "rsvd[qr=cholqr_v4]"]),
}


def kv_like_matrix(m: int, n: int, *, seed: int = 0, decay: float = 0.9, outliers: int = 4,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """A synthetic (m tokens × n features) float32 matrix shaped like a K/V cache.

    Heavy-tailed spectrum σ_i ∝ i^(-decay) with random singular vectors, a per-channel mean
    offset, and ``outliers`` feature channels scaled up 20× (the massive channels of keys).
    """
    g = torch.Generator().manual_seed(seed)  # the draws come from the CPU; the algebra runs on ``device``
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g).to(device))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g).to(device))
    s = torch.arange(1, n + 1, dtype=torch.float32, device=device).pow(-decay) * m ** 0.5
    A = (U * s) @ V.mT + 0.5 * torch.randn(1, n, generator=g).to(device)
    A[:, torch.randperm(n, generator=g)[:outliers].to(device)] *= 20.0
    return A


def natural_text(n_chars: int) -> str:
    """``n_chars`` of English prose from the essay haystack shipped with kvsvd (repeated if needed)."""
    from importlib import resources
    text = (resources.files("kvsvd") / "data" / "essays.txt").read_text()
    return (text * (1 + n_chars // len(text)))[:n_chars]


def real_kv_matrices(tokens: int, groups: list[int]) -> dict[str, torch.Tensor]:
    """Pre-RoPE K and V of SmolLM2-135M on ``tokens`` tokens of prose, layers 0.. grouped as in xKV.

    Returns ``{"smollm2_K_G4": (tokens, 4·192) float32, ...}`` for the first group of each size.
    """
    from ..models import capture_kv, load_model
    model, tok = load_model("smollm2-135m")
    ids = tok(natural_text(tokens * 8), return_tensors="pt").input_ids[:, :tokens]
    keys, values = capture_kv(model, ids)
    out = {}
    for G in groups:
        out[f"smollm2_K_G{G}"] = torch.cat(keys[:G], dim=-1)[0]
        out[f"smollm2_V_G{G}"] = torch.cat(values[:G], dim=-1)[0]
    return out


def measure_roofline(device: torch.device, dtype: torch.dtype, size: int = 4096) -> dict[str, float]:
    """Measured memory bandwidth (bytes/s, a large copy) and GEMM throughput (flop/s) on ``device``."""
    x = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=device)
    a = torch.randn(size, size, device=device).to(dtype)

    def best(fn, reps: int = 5) -> float:
        fn()
        _sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    copy_s = best(lambda: x.clone())
    gemm_s = best(lambda: a @ a)
    return {"bandwidth_Bps": 2 * x.numel() * 4 / copy_s, "flops": 2 * size**3 / gemm_s}


def roofline_ms(m: int, n: int, rank: int, oversample: int, n_iter: int, itemsize: int, roof: dict) -> float:
    """(2q+2)·max(bytes(A)/BW, 2·m·n·ℓ/FLOPS) in ms: the passes-over-A lower bound."""
    ell = min(rank + oversample, m, n)
    per_pass = max(m * n * itemsize / roof["bandwidth_Bps"], 2 * m * n * ell / roof["flops"])
    return (2 * n_iter + 2) * per_pass * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _configs(profile: Profile, device: torch.device) -> Iterator[tuple[str, callable]]:
    dtype = DTYPES[profile.dtype]
    for m, n in profile.shapes:
        yield f"kv_synth_{m}x{n}", lambda m=m, n=n: kv_like_matrix(m, n, device=device).to(dtype)
    if profile.real_tokens:
        cache: dict[str, torch.Tensor] = {}
        for G in profile.real_groups:
            for kind in ("K", "V"):
                def load(G=G, kind=kind):
                    if not cache:
                        cache.update(real_kv_matrices(profile.real_tokens, profile.real_groups))
                    return cache[f"smollm2_{kind}_G{G}"].to(device=device, dtype=dtype)
                yield f"smollm2_{kind}_G{G}_{profile.real_tokens}x{192 * G}", load


def bench_config(A: torch.Tensor, specs: list[str], rank: int, n_iter: int, oversample: int,
                 repeats: int, opt: float, shared: dict[str, dict] | None = None) -> dict[str, dict]:
    """Time every method side by side: one warm-up each, then ``repeats`` round-robin rounds
    (method order rotated each round) so that drift of the machine hits all methods alike.
    Error and orthogonality come from the warm-up call (the generator makes calls identical).

    ``shared`` (one dict per matrix, filled here) holds the RANK_INDEPENDENT methods: their
    warm-up factorises at full rank and they are timed in the first configuration only; later
    configurations of the matrix reuse those records and slice their factors to ``rank``
    (what the method itself returns at that rank).
    """
    shared = {} if shared is None else shared
    calls = {}
    out: dict[str, dict] = {}
    for spec in specs:
        fn_name, kwargs = MethodSpec(spec).parse()
        fn = get_svd(fn_name)
        calls[spec] = lambda timer=None, k=rank, fn=fn, kwargs=kwargs: fn(
            A, k, n_iter=n_iter, oversample=oversample,
            generator=torch.Generator(device=A.device).manual_seed(0), timer=timer, **kwargs)
        if fn_name in RANK_INDEPENDENT and spec not in shared:
            shared[spec] = {"factors": calls[spec](k=min(A.shape[-2:])), "records": []}
        if spec in shared:
            U, S, Vh = shared[spec]["factors"]
            U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
        else:
            U, S, Vh = calls[spec]()
        err = float(truncation_error(A.float(), U, S, Vh))
        Ud = U.double()
        orth = float((Ud.mT @ Ud - torch.eye(rank, dtype=torch.float64, device=A.device)).abs().max())
        out[spec] = {"records": shared[spec]["records"] if spec in shared else [], "error": err, "orth": orth}
    timed = [s for s in specs if not (s in shared and shared[s]["records"])]
    for r in range(repeats if timed else 0):
        for spec in timed[r % len(timed):] + timed[:r % len(timed)]:
            timer = StageTimer()
            _sync(A.device)
            t0 = time.perf_counter()
            calls[spec](timer)
            _sync(A.device)
            out[spec]["records"].append({"ms": (time.perf_counter() - t0) * 1e3, "breakdown_ms": timer.breakdown_ms()})
    m, n = A.shape[-2:]
    return {spec: {"records": o["records"], "timed_once_per_matrix": spec in shared,
                   "path": spec_path(spec, m, n, rank, n_iter, oversample),
                   "summary": _summary(o["records"], o["error"], opt, o["orth"])} for spec, o in out.items()}


def spec_path(spec: str, m: int, n: int, rank: int, n_iter: int, oversample: int) -> str:
    """The SVD path (``kvsvd.svd.SVDPath.label``) a method spec runs on an (m, n) matrix."""
    fn_name, kwargs = MethodSpec(spec).parse()
    return svd_path(fn_name, m, n, rank, n_iter=n_iter, oversample=oversample, qr=kwargs.get("qr", "auto")).label


def _summary(records: list[dict], err: float, opt: float, orth: float) -> dict:
    ms = sorted(r["ms"] for r in records)
    stages = sorted({k for r in records for k in r["breakdown_ms"]})
    return {"count": len(ms), "total_time_ms": sum(ms), "avg_time_ms": sum(ms) / len(ms),
            "median_time_ms": ms[len(ms) // 2] if len(ms) % 2 else 0.5 * (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]),
            "min_time_ms": ms[0], "max_time_ms": ms[-1],
            "avg_breakdown_ms": {s: sum(r["breakdown_ms"].get(s, 0.0) for r in records) / len(ms) for s in stages},
            "error": err, "optimal_error": opt, "rel_error": err / opt if opt > 0 else float("nan"),
            "orthogonality_U": orth}


def run(profile_name: str = "cpu", device: str = "cpu", out: str | Path = "results/kernels",
        force: bool = False, repeats: int | None = None) -> list[dict]:
    """Run a profile; returns the per-configuration results (also written as JSON under ``out``)."""
    if profile_name not in PROFILES:
        raise ValueError(f"profile={profile_name!r} is unknown; accepted: {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]
    dev = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roof = measure_roofline(dev, DTYPES[profile.dtype])
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
           "device_type": dev.type, "torch": torch.__version__, "threads": torch.get_num_threads(), "roofline": roof}
    results = []
    cells = [(name, make, r, q) for name, make in _configs(profile, dev) for r in profile.ranks for q in profile.n_iters]
    current: dict = {"name": None}  # the matrix in hand, its FP64 spectrum, its shared timings

    def measure(name: str, make, rank: int, n_iter: int) -> dict:
        if current["name"] != name:
            A = make()
            current.update(name=name, A=A, spectrum=singular_values(A), shared={})
        A = current["A"]
        m, n = A.shape
        opt = float(current["spectrum"][rank:].pow(2).sum().sqrt())  # Eckart–Young, as svd.optimal_error
        specs = [s for s in profile.methods if not (s.startswith("full_svd") and m * n > profile.skip_full_above)]
        methods = bench_config(A, specs, rank, n_iter, profile.oversample, repeats or profile.repeats, opt,
                               current["shared"])
        res = {"config": {"matrix": name, "m": m, "n": n, "rank": rank, "n_iter": n_iter,
                          "oversample": profile.oversample, "dtype": profile.dtype, "profile": profile_name},
               "environment": env,
               "roofline_ms": roofline_ms(m, n, rank, profile.oversample, n_iter, A.element_size(), roof),
               "methods": methods}
        return res

    for name, make, rank, n_iter in tqdm(cells, desc="kernel bench"):
        path = out / f"{name}_r{rank}_q{n_iter}_{profile.dtype}.json"
        results.append(load_or_measure(path, force, partial(measure, name, make, rank, n_iter)))
    return results


def ratio_table(results: list[dict]) -> str:
    """Speed ratios measured side by side: median ms of lowrank_svd / full_svd over each method's."""
    lines = [f"{'matrix':<28}{'rank':>5}{'q':>3}  {'method':<28}{'path':<18}{'med ms':>9}{'x lowrank':>10}{'x full':>8}"
             f"{'err/opt':>9}{'vs roof':>8}"]
    for res in results:
        c, meth = res["config"], res["methods"]
        base = {k: meth[k]["summary"]["median_time_ms"] for k in ("lowrank_svd", "full_svd") if k in meth}
        for spec, r in meth.items():
            s = r["summary"]
            lr = base.get("lowrank_svd", float("nan")) / s["median_time_ms"]
            fu = base.get("full_svd", float("nan")) / s["median_time_ms"]
            lines.append(f"{c['matrix']:<28}{c['rank']:>5}{c['n_iter']:>3}  {spec:<28}{r['path']:<18}"
                         f"{s['median_time_ms']:>9.2f}{lr:>10.2f}{fu:>8.1f}{s['rel_error']:>9.4f}"
                         f"{s['median_time_ms'] / res['roofline_ms']:>8.2f}")
    return "\n".join(lines)
