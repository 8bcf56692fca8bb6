"""Notebook glue: per-profile settings and the cheap computations behind the widgets.

Each notebook reads ``settings(notebook, profile)`` (``smoke`` for CI, ``cpu`` for
``make reproduce`` on 2 cores, ``gpu`` for a CUDA machine) and hands an ``explore_*``
function to :func:`kvsvd.widgets.controls`, which calls it with the slider values.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from . import analysis
from .accounting import DENSE_ENTRY_BYTES, ModelShape
from .config import CompressionConfig
from .methods.lowrank import LowRankParams
from .svd import get_svd, optimal_error, truncation_error
from .timing import StageTimer

SETTINGS: dict[str, dict[str, dict]] = {
    "01_spectrum_analysis": {
        "smoke": dict(tokens=256, similarity_rank=16),
        "cpu": dict(tokens=2048, similarity_rank=32),
        "gpu": dict(tokens=8192, similarity_rank=64),
    },
    "02_kernel_derivation_and_stability": {
        "smoke": dict(profiles=("smoke", "sweep_smoke"), orth_shape=(512, 32), demo_shape=(1024, 96)),
        "cpu": dict(profiles=("cpu", "sweep"), orth_shape=(4096, 64), demo_shape=(8192, 768)),
        "gpu": dict(profiles=("gpu",), orth_shape=(65536, 256), demo_shape=(65536, 4096)),
    },
    "03_kv_compressibility": {
        "smoke": dict(tokens=256, groups=(1, 2), ratios=(4, 8), factor_dtypes=("fp32", "int8"), calib_tokens=256,
                      rd_bits=(1, 2), basis_lengths=(128, 256), basis_bits=(2,)),
        "cpu": dict(tokens=2048, groups=(1, 2, 4, 8), ratios=(2, 3, 4, 6, 8, 12, 16),
                    factor_dtypes=("fp32", "bf16", "int8", "int4"), calib_tokens=2048, rd_bits=(0.5, 1, 2, 3, 4),
                    basis_lengths=(512, 1024, 2048, 4096), basis_bits=(1, 2, 3)),
        "gpu": dict(tokens=8192, groups=(1, 2, 4, 8), ratios=(2, 3, 4, 6, 8, 12, 16),
                    factor_dtypes=("fp32", "bf16", "int8", "int4"), calib_tokens=8192, rd_bits=(0.5, 1, 2, 3, 4),
                    basis_lengths=(1024, 2048, 4096, 8192), basis_bits=(1, 2, 3)),
    },
    "04_ruler_accuracy_and_latency": {
        "smoke": dict(grids=("configs/smoke.yaml",), targets=dict(config="configs/smoke.yaml", run=True),
                      frontier=dict(config="configs/smoke_frontier.yaml", run=True),
                      contexts=(256,), decode_tokens=4,
                      latency=dict(ratios=(4.0,), groups=(1, 2), n_iters=(0,), sweep_group=2),
                      attention=dict(contexts=(512,), key_spaces=("post_rope",), decode_tokens=2, rounds=2),
                      decode=dict(context_lengths=(256,), decode_tokens=2, rounds=2,
                                  methods=({"method": "none"}, {"method": "transform", "ratio": 4, "basis": "prompt"}))),
        "cpu": dict(grids=("configs/cpu.yaml", "configs/cpu_sweeps.yaml", "configs/cpu_peers.yaml"),
                    targets=dict(config="configs/cpu_targets.yaml", run=False),
                    frontier=dict(config="configs/cpu_frontier.yaml", run=False), contexts=(1024, 2048, 4096),
                    decode_tokens=24, latency=dict(ratios=(4.0,), groups=(1, 2, 4), n_iters=(0, 4)),
                    attention=dict(contexts=(8160,), key_spaces=("post_rope", "pre_rope"), decode_tokens=16,
                                   rounds=2),
                    decode=dict(context_lengths=(1024, 2048, 4096), decode_tokens=8, rounds=3)),
        "gpu": dict(grids=("configs/gpu.yaml",), targets=dict(config="configs/cpu_targets.yaml", run=False),
                    frontier=dict(config="configs/cpu_frontier.yaml", run=False),
                    contexts=(4096, 8192), decode_tokens=64,
                    latency=dict(ratios=(4.0, 8.0), groups=(1, 2, 4, 8), n_iters=(0, 1, 4)),
                    attention=dict(contexts=(4096, 8160), key_spaces=("post_rope", "pre_rope"), decode_tokens=64,
                                   rounds=2),
                    decode=dict(context_lengths=(2048, 4096, 8000), decode_tokens=32, rounds=3)),
    },
}


# What each notebook writes under its results folder (globs), and the order of the profiles by size.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "01_spectrum_analysis": ("analysis/spectrum_stats.csv", "analysis/spectra.csv", "analysis/layer_similarity.csv",
                             "figures/01_*"),
    "02_kernel_derivation_and_stability": ("analysis/orthogonality.csv", "kernels/*", "kernels_sweep/*",
                                           "figures/02_*"),
    "03_kv_compressibility": ("analysis/pca_calibration.safetensors", "analysis/compressibility.csv",
                              "analysis/rate_distortion.csv", "analysis/basis_by_context.csv", "figures/03_*"),
    "04_ruler_accuracy_and_latency": ("eval/*", "eval_targets/*", "eval_frontier/*", "cache/*", "attention/*",
                                      "decode/*", "figures/04_*"),
}
PROFILE_SIZE = {"smoke": 0, "cpu": 1, "gpu": 2}
MANIFEST = "profiles.json"  # {output glob: profile of the run that last wrote it}, one per results folder


def settings(notebook: str, profile: str) -> dict:
    """The settings of ``notebook`` for ``profile``; errors name the accepted values."""
    if notebook not in SETTINGS:
        raise ValueError(f"notebook={notebook!r} is unknown; accepted: {', '.join(SETTINGS)}")
    if profile not in SETTINGS[notebook]:
        raise ValueError(f"profile={profile!r} is unknown; accepted: {', '.join(SETTINGS[notebook])}")
    return dict(SETTINGS[notebook][profile])


def results_folder(notebook: str, profile: str, results_dir: str | Path | None = None,
                   committed: str | Path = "../results") -> Path:
    """The folder ``notebook`` writes its tables, JSON and figures to under ``profile``.

    ``results_dir`` when given (``make reproduce`` passes ``../results``); otherwise the git-ignored
    scratch folder ``<committed>/interactive/<profile>``, first filled with copies of the committed
    outputs of this notebook made with the same profile, so that finished grid cells and benchmark
    configurations are reused and nothing committed is touched. ``MANIFEST`` in the folder records
    the profile of each output; a run with a smaller profile than the one that made existing
    outputs refuses, naming the files and both profiles."""
    settings(notebook, profile)
    committed = Path(committed)
    out = Path(results_dir) if results_dir is not None else committed / "interactive" / profile
    if results_dir is None:
        source = committed / "gpu" if profile == "gpu" else committed
        made = _manifest(source)
        for pattern in OUTPUTS[notebook]:
            if made.get(pattern) == profile and not any(out.glob(pattern)):
                for path in source.glob(pattern):
                    (out / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if path.is_dir() else shutil.copy2)(path, out / path.relative_to(source))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / MANIFEST, "a+") as manifest:  # locked: notebooks may start side by side on one folder
        fcntl.flock(manifest, fcntl.LOCK_EX)
        manifest.seek(0)
        recorded = json.loads(manifest.read() or "{}")
        larger = {pattern: sorted(out.glob(pattern)) for pattern in OUTPUTS[notebook]
                  if PROFILE_SIZE.get(recorded.get(pattern), -1) > PROFILE_SIZE[profile]}
        clashes = {pattern: found for pattern, found in larger.items() if found}
        if clashes:
            files = sorted(str(f) for found in clashes.values() for f in found)
            made_with = sorted({recorded[pattern] for pattern in clashes})
            raise FileExistsError(f"profile={profile!r} would replace results made with profile "
                                  f"{' and '.join(map(repr, made_with))} in {out}: {', '.join(files[:8])}"
                                  f"{' …' if len(files) > 8 else ''}; run with that profile, or set results_dir to "
                                  "another folder")
        (out / "analysis").mkdir(exist_ok=True)
        manifest.seek(0)
        manifest.truncate()
        manifest.write(json.dumps({**recorded, **dict.fromkeys(OUTPUTS[notebook], profile)}, indent=1,
                                  sort_keys=True) + "\n")
    return out


def _manifest(folder: Path) -> dict[str, str]:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def run_grids(paths, results: Path, model, tokenizer, folder: str = "eval") -> list[Path]:
    """Run (or resume) each grid YAML with its rows written to ``results/<folder>/<name>.jsonl``."""
    import yaml

    from .grid import run
    outs = []
    for path in paths:
        raw = yaml.safe_load(Path(path).read_text())
        raw["out"] = str(Path(results) / folder / f"{raw['name']}.jsonl")
        outs.append(run(raw, model, tokenizer))
    return outs


def committed_grid(config: str | Path, run: bool, results: Path, model, tokenizer, folder: str) -> Path | None:
    """A long grid's rows, ``results/<folder>/<name>.jsonl`` (the target grid in ``eval_targets``, the
    frontier grid in ``eval_frontier``): run (or resumed) here when ``run`` (the smoke profile:
    seconds); otherwise the file already there (the CPU grids take hours on 2 cores and run on their
    own, ``python -m kvsvd eval CONFIG``), or None."""
    if run:
        return run_grids([config], results, model, tokenizer, folder=folder)[0]
    import yaml
    out = Path(results) / folder / f"{yaml.safe_load(Path(config).read_text())['name']}.jsonl"
    return out if out.exists() else None


# ------------------------------------------------------------------------- widget computations

_WARMED: set[tuple] = set()
BESIDE = dict(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # a legend beside the axes, never over data


def _timed(key: tuple, call):
    """``call(timer)`` with a fresh StageTimer; returns (its result, the timer, wall ms). The first
    time ``key`` is seen, one untimed call runs first: it pays one-off costs (allocator, library
    initialisation) that are not the kernel's time."""
    if key not in _WARMED:
        call(StageTimer())
        _WARMED.add(key)
    timer = StageTimer()
    t0 = time.perf_counter()
    result = call(timer)
    return result, timer, (time.perf_counter() - t0) * 1e3


def explore_group(sample: analysis.KVSample, *, kind: str, rank: int, n_iter: int, layer_group_size: int,
                  first_layer: int | None = None) -> dict:
    """Compress one group of ``layer_group_size`` layers of ``kind`` at ``rank`` (rsvd, n_iter) and
    plot the per-layer reconstruction and attention-output errors. Returns the numbers drawn."""
    G, L = layer_group_size, sample.num_layers
    if not 1 <= G <= L:
        raise ValueError(f"layer_group_size={G} is out of range; accepted: [1, {L}]")
    start = first_layer if first_layer is not None else (L - G) // 2
    cfg = CompressionConfig("svd" if G == 1 else "xkv", LowRankParams(rank_k=rank, rank_v=rank, n_iter=n_iter),
                            layer_group_size=G)
    layers = list(range(start, start + G))
    x = torch.stack([sample.matrix(kind, l) for l in layers], 1)[None]
    store, timer, _ = _timed(("group", cfg.method, tuple(x.shape)), lambda timer: cfg.spec.compress(
        x, cfg, kind=kind[0], layers=layers, heads=sample.kv_heads, timer=timer))
    rows = []
    for j, l in enumerate(layers):
        x_hat = store.layer(j, torch.float32)[0]
        ref = analysis.replaced_attention(sample, "v", l, sample.v[l])  # nothing replaced: exact
        out = analysis.replaced_attention(sample, kind, l, x_hat)
        rows.append((l, float((x_hat - x[0, :, j]).norm() / x[0, :, j].norm()), float((out - ref).norm() / ref.norm())))
    held = analysis.held_bytes(store)
    ratio = x.numel() * DENSE_ENTRY_BYTES / held  # against the same entries in a 16-bit cache
    fig, ax = plt.subplots(figsize=(7, 3.2))
    idx = torch.arange(len(rows)).float()
    ax.bar(idx - 0.2, [r[1] for r in rows], 0.4, label="reconstruction error")
    ax.bar(idx + 0.2, [r[2] for r in rows], 0.4, label="attention-output error")
    ax.set(xticks=idx.tolist(), xticklabels=[f"layer {r[0]}" for r in rows], ylabel="relative error",
           title=f"{analysis.KIND_LABELS[kind]}: G={G}, rank {rank}, "
                 f"n_iter {n_iter} ({store.path}) → {ratio:.1f}× fewer bytes than 16-bit, {timer.total_ms():.1f} ms "
                 "(after a warm-up call)")
    ax.legend(**BESIDE)
    plt.show()
    return {"ratio": ratio, "errors": rows, "ms": timer.breakdown_ms()}


def explore_rsvd(A: torch.Tensor, *, rank: int, n_iter: int, method: str) -> dict:
    """One call of ``method`` (rsvd, lowrank_svd, full_svd) on A: time, error vs optimum, and its
    singular values against the exact ones."""
    fn = get_svd(method)
    (U, S, Vh), timer, ms = _timed(("svd", method, tuple(A.shape), A.dtype, str(A.device)), lambda timer: fn(
        A, rank, n_iter=n_iter, generator=torch.Generator(device=A.device).manual_seed(0), timer=timer))
    rel = float(truncation_error(A, U, S, Vh) / optimal_error(A, rank))
    exact = torch.linalg.svdvals(A.double())[:rank]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.semilogy(exact.cpu(), "k-", label="exact σᵢ")
    ax.semilogy(S.double().cpu(), "o", ms=3, label=f"{method} σᵢ")
    ax.set(xlabel="index i", ylabel="σᵢ", title=f"{method}, rank {rank}, n_iter {n_iter}: {ms:.1f} ms (after a warm-up "
                                                 f"call), error = {rel:.4f} × optimum")
    ax.legend(**BESIDE)
    plt.show()
    return {"ms": ms, "rel_error": rel, "breakdown_ms": timer.breakdown_ms()}


def explore_answer(model, tokenizer, sample: dict, task: str, *, method: str, rank: int, n_iter: int,
                   layer_group_size: int) -> dict:
    """Answer one RULER sample with a LowRankCache at total rank ``rank`` per group (one third to
    keys, as config_for_ratio splits it); print prediction, score and bytes, plot the stage times."""
    from . import ruler
    from .cache import LowRankCache
    from .evaluate import answer
    L = ModelShape.of(model.config).layers
    G = 1 if method == "svd" else layer_group_size
    cfg = CompressionConfig(method, LowRankParams(rank_k=max(1, rank // 3), rank_v=max(1, rank - rank // 3),
                                                  n_iter=n_iter), layer_group_size=G, start_layer=L % G)
    cache = LowRankCache(cfg, model.config)
    res = answer(model, tokenizer, sample, cache, max_new_tokens=24)
    mem = cache.memory_report()
    score = ruler.score(task, [res["prediction"]], [sample["outputs"]])
    stages: dict[str, float] = {}
    for entry in cache.compression_log:
        for s, ms in entry["breakdown_ms"].items():
            stages[s] = stages.get(s, 0.0) + ms
    fig, ax = plt.subplots(figsize=(7, 1.8))
    left = 0.0
    for s, ms in stages.items():
        ax.barh([0], [ms], left=left, label=s)
        left += ms
    ax.set(yticks=[], xlabel="compression ms (all groups)",
           title=f"{method} G={G} rank {rank} q={n_iter}: {mem['ratio']:.1f}× fewer bytes than 16-bit, score {score:.0f}")
    ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.45), frameon=False)  # below the bar
    plt.show()
    print(f"gold: {sample['outputs']}  prediction: {res['prediction'].strip()!r}")
    return {"score": score, "ratio": mem["ratio"], "prediction": res["prediction"], "stages_ms": stages}
