"""Every figure of the notebooks, drawn from saved results alone (``python -m kvsvd figures``).

A figure function takes the results folder R and returns ``(figure, caption)``; the caption
states the takeaway with numbers read from the same data. :func:`save` writes
``R/figures/<name>.png`` and ``.svg`` with the caption under the axes; :func:`show` (used by
the notebooks) saves, displays the figure and returns the caption. Inputs, relative to R:

    analysis/spectra.csv, spectrum_stats.csv, layer_similarity.csv   (notebook 01)
    analysis/orthogonality.csv, kernels/*.json, kernels_sweep/*.json (notebook 02)
    analysis/compressibility.csv, rate_distortion.csv, basis_by_context.csv (notebook 03)
    eval/*.jsonl, eval_targets/*.jsonl, cache/*.json, attention/*.json (notebook 04)
"""

from __future__ import annotations

import json
import re
import textwrap
import warnings
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .analysis import KIND_LABELS

STAGES = ("preparation", "projection", "power_iteration", "final_qr", "small_svd_fp32", "lift")
FigureFn = Callable[[Path], tuple[plt.Figure, str]]
FIGURES: dict[str, tuple[FigureFn, tuple[str, ...]]] = {}


def figure(name: str, *inputs: str):
    """Register a figure function under ``name`` with the input globs it needs (relative to R)."""
    def wrap(fn: FigureFn) -> FigureFn:
        FIGURES[name] = (fn, inputs)
        return fn
    return wrap


def _ratio_axis(ax) -> None:
    """Log x axis of '× fewer bytes' with plain tick labels (1×, 2×, 4×, ...)."""
    lo, hi = ax.get_xlim()
    ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.minorticks_off()


def available(results: Path) -> list[str]:
    """Names of the figures whose inputs exist under ``results``."""
    return [n for n, (_, inputs) in FIGURES.items() if all(any(Path(results).glob(g)) for g in inputs)]


def save(fig: plt.Figure, caption: str, name: str, results: Path) -> list[Path]:
    """Write R/figures/<name>.png and .svg with the caption under the axes."""
    out = Path(results) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    fig.text(0.01, 0.0, textwrap.fill(caption, 130), ha="left", va="top", fontsize=9)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Description": caption})
    return paths


def draw(name: str, results: Path) -> tuple[plt.Figure, str]:
    if name not in FIGURES:
        raise ValueError(f"figure={name!r} is unknown; accepted: {', '.join(FIGURES)}")
    fn, inputs = FIGURES[name]
    missing = [g for g in inputs if not any(Path(results).glob(g))]
    if missing:
        raise FileNotFoundError(f"figure {name!r} needs {missing} under {results}; run its notebook first")
    with sns.axes_style("whitegrid"):
        fig, caption = fn(Path(results))
    save(fig, caption, name, results)
    return fig, caption


def show(name: str, results: Path) -> None:
    """Notebook use: draw and save the figure and display it with its caption (Markdown), once: nothing
    is returned, so a cell ending with this call shows no second copy of the caption as its Out[]."""
    from IPython.display import Markdown, display
    fig, caption = draw(name, results)
    plt.show()
    display(Markdown(f"**Figure {name}.** {caption}"))
    plt.close(fig)


def redraw_all(results: Path) -> list[str]:
    """Redraw every figure whose inputs exist (no model, no computation); returns their names."""
    names = available(results)
    if not names:
        raise FileNotFoundError(f"no saved results under {results}: nothing to draw")
    for name in names:
        plt.close(draw(name, results)[0])
    return names


# --------------------------------------------------------------------------- notebook 01: spectra

@figure("01_spectra", "analysis/spectra.csv")
def spectra(R: Path):
    df = pd.read_csv(R / "analysis/spectra.csv")
    fig, ax = plt.subplots(figsize=(7, 4))
    first = {}
    for kind, g in df.groupby("kind", sort=False):
        q = g.groupby("index")["sigma"].quantile([0.25, 0.5, 0.75]).unstack()
        ax.plot(q.index, q[0.5], label=KIND_LABELS[kind])
        ax.fill_between(q.index, q[0.25], q[0.75], alpha=0.2)
        below = q.index[q[0.5] < 0.1]
        first[kind] = int(below[0]) if len(below) else int(q.index[-1])
    ax.set(yscale="log", xlabel="singular value index i (per 64-dim head)", ylabel="σᵢ / σ₁ (median, IQR band)",
           title="Per-head singular value spectra of the KV cache")
    ax.legend()
    cap = (f"Median over layers × KV heads, SmolLM2-135M prefill: σᵢ drops below 10% of σ₁ at index "
           f"{first.get('k_pre')} for pre-RoPE keys, {first.get('k_post')} for post-RoPE keys and {first.get('v')} "
           "for values — keys are low-rank, RoPE spreads their energy, values are the hard part.")
    return fig, cap


@figure("01_energy_rank", "analysis/spectrum_stats.csv")
def energy_rank(R: Path):
    df = pd.read_csv(R / "analysis/spectrum_stats.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    df["kind_label"] = df["kind"].map(KIND_LABELS)
    sns.lineplot(df, x="layer", y="rank_90", hue="kind_label", ax=axes[0], errorbar=("pi", 100))
    axes[0].set(ylabel="rank for 90% energy (of 64)", title="Rank needed per head, by layer")
    sns.lineplot(df, x="layer", y="effective_rank", hue="kind_label", ax=axes[1], errorbar=("pi", 100))
    axes[1].set(ylabel="effective rank exp(H(σ/Σσ))", title="Effective rank per head, by layer")
    for ax in axes:
        ax.legend(title=None)
    med = df.groupby("kind")["rank_90"].median().to_dict()
    k, kp, v = (med.get(x, float("nan")) for x in ("k_pre", "k_post", "v"))
    cap = (f"Bands span the KV heads. Median rank for 90% of a head's energy: {k:.0f} (K pre-RoPE), {kp:.0f} "
           f"(K post-RoPE), {v:.0f} (V) of 64 dimensions"
           + (f" — values need {v / k:.1f}× the rank of pre-RoPE keys, so the rank budget should favour V."
              if v > k else "."))
    return fig, cap


@figure("01_variance_spread", "analysis/spectrum_stats.csv")
def variance_spread(R: Path):
    df = pd.read_csv(R / "analysis/spectrum_stats.csv")
    df["kind_label"] = df["kind"].map(KIND_LABELS)
    fig, ax = plt.subplots(figsize=(6, 4))
    with warnings.catch_warnings():  # seaborn 0.13 still passes matplotlib's deprecated ``vert``
        warnings.simplefilter("ignore", DeprecationWarning)
        sns.boxplot(df, x="kind_label", y="variance_spread", ax=ax, log_scale=True)
    ax.set(xlabel="", ylabel="max / min channel variance within a head",
           title="Variance spread over head channels (all layers × heads)")
    med = df.groupby("kind")["variance_spread"].median().to_dict()
    k, v = med.get("k_pre", float("nan")), med.get("v", float("nan"))
    cap = (f"Median spread {k:.0f}× for pre-RoPE keys and {v:.1f}× for values on SmolLM2-135M (an earlier study "
           "measured 132× vs 4× on Qwen2.5-7B)" + (": a few key channels dominate, value channels matter more evenly."
                                                   if k > 2 * v else "."))
    return fig, cap


@figure("01_layer_similarity", "analysis/layer_similarity.csv")
def layer_similarity(R: Path):
    df = pd.read_csv(R / "analysis/layer_similarity.csv")
    kinds = [k for k in KIND_LABELS if k in set(df["kind"])]
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 7.5), squeeze=False)
    notes = []
    for j, kind in enumerate(kinds):
        g = df[df["kind"] == kind]
        overlap = f"token-subspace overlap (r={int(g['rank'].iloc[0])})"
        for i, (col, label) in enumerate((("cka", "linear CKA"), ("overlap", overlap))):
            mat = g.pivot(index="layer_a", columns="layer_b", values=col)
            sns.heatmap(mat, ax=axes[i, j], vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": label})
            axes[i, j].set(title=f"{KIND_LABELS[kind]}: {label}", xlabel="layer", ylabel="layer")
        gap = (g["layer_b"] - g["layer_a"]).abs()
        notes.append(f"{KIND_LABELS[kind]} {g.loc[gap == 1, 'overlap'].mean():.2f} vs "
                     f"{g.loc[gap >= 8, 'overlap'].mean():.2f}")
    fig.tight_layout()
    cap = ("Similarity of layers over the same tokens. Mean token-subspace overlap (mean cos² of principal angles "
           f"between top-{int(df['rank'].iloc[0])} left singular subspaces) for adjacent vs ≥8-apart layers: "
           + "; ".join(notes)
           + ". Neighbouring layers share their dominant token directions, which is what lets xKV store one token "
             "factor for a group of layers.")
    return fig, cap


# ------------------------------------------------------------------------ notebook 02: the kernels

def _kernel_rows(folder: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(folder.glob("*.json")):
        res = json.loads(path.read_text())
        c = res["config"]
        for method, r in res["methods"].items():
            s = r["summary"]
            rows.append({**{k: c[k] for k in ("matrix", "m", "n", "rank", "n_iter")}, "method": method,
                         "path": r["path"], "median_ms": s["median_time_ms"], "rel_error": s["rel_error"],
                         "roofline_ms": res["roofline_ms"], "device": res["environment"]["device"],
                         **{f"stage_{k}": v for k, v in s["avg_breakdown_ms"].items()}})
    return pd.DataFrame(rows)


@figure("02_orthogonality_vs_kappa", "analysis/orthogonality.csv")
def orthogonality(R: Path):
    df = pd.read_csv(R / "analysis/orthogonality.csv")
    dtypes = list(dict.fromkeys(df["dtype"]))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), sharey=True, squeeze=False)
    ceiling = 10.0
    for ax, dt in zip(axes[0], dtypes):
        g = df[df["dtype"] == dt].copy()
        g["plotted"] = g["orth_error"].replace(np.inf, ceiling).clip(upper=ceiling)
        sns.lineplot(g, x="kappa", y="plotted", hue="method", style="method", markers=True, dashes=False, ax=ax)
        ax.axhline(ceiling, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="condition number κ(X)", ylabel="‖QᵀQ − I‖max",
               title=f"X handed over in {dt.upper()} (breakdown plotted at {ceiling:g})")
        ax.legend(fontsize=8)
    fp = df[df["dtype"] == dtypes[0]]
    ok = fp[fp["orth_error"] < 1e-4].groupby("method")["kappa"].max().reindex(sorted(set(fp["method"])))
    fig.tight_layout()
    failed = df[df["failed"]].groupby("method")["kappa"].min()
    cap = (f"Largest κ with orthogonality error < 1e-4 in {dtypes[0].upper()}: "
           + ", ".join(f"{m} {k:.0e}" if k == k else f"{m} none" for m, k in ok.items())
           + ". Breakdowns (Cholesky failure or NaN) from κ = " + (", ".join(
               f"{m} {k:.0e}" for m, k in failed.items()) if len(failed) else "none in this range")
           + ". Theory: CholQR's error grows as κ²u, CholQR2 holds while κ ≲ u^-1/2, shifted CholQR3 up to κ ≈ u^-1.")
    return fig, cap


@figure("02_kernel_speed", "kernels/*.json")
def kernel_speed(R: Path):
    df = _kernel_rows(R / "kernels")
    base = df[df["method"] == "lowrank_svd"].set_index(["matrix", "rank", "n_iter"])["median_ms"]
    df = df[df["method"] != "lowrank_svd"].copy()
    df["speedup"] = [base.get((a, b, c), np.nan) / t for a, b, c, t in
                     zip(df["matrix"], df["rank"], df["n_iter"], df["median_ms"])]
    df["config"] = df["matrix"].str.replace("kv_synth_", "synthetic ") + " r" + df["rank"].astype(str)
    fig, ax = plt.subplots(figsize=(12, 5))
    sns.barplot(df, x="config", y="speedup", hue="method", ax=ax)
    ax.axhline(1.0, color="black", lw=1)
    ax.set(yscale="log", xlabel="matrix (tokens × features) and rank", ylabel="× faster than torch.svd_lowrank",
           title=f"SVD kernels side by side (median of repeats, {df['device'].iloc[0]})")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7, ncol=3)
    rs = df[df["method"] == "rsvd"]
    full = df.loc[df["method"] == "full_svd", "speedup"]
    by_path = []
    for kind, g in rs.groupby(rs["path"].str.split().str[0]):
        by_path.append(f"on the {kind} path ({g['matrix'].nunique()} matrices: "
                       f"{', '.join(sorted(set(g['n'].astype(str))))} features) "
                       f"{g['speedup'].min():.2f}–{g['speedup'].max():.2f}×")
    cap = ("rsvd (qr='auto') against torch.svd_lowrank at the same n_iter and oversampling, by the path auto took: "
           + "; ".join(by_path) + f". The full SVD runs at {full.min():.2f}–{full.max():.2f}× svd_lowrank's speed.")
    return fig, cap


@figure("02_n_iter_sweep", "kernels_sweep/*.json")
def n_iter_sweep(R: Path):
    df = _kernel_rows(R / "kernels_sweep")
    rank = sorted(df["rank"].unique())[len(df["rank"].unique()) // 2]
    rs = df[(df["method"] == "rsvd") & (df["rank"] == rank)].sort_values("n_iter")
    lr = df[(df["method"] == "lowrank_svd") & (df["rank"] == rank)].sort_values("n_iter")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bottom = np.zeros(len(rs))
    x = np.arange(len(rs))
    for stage in STAGES:
        col = f"stage_{stage}"
        if col in rs:
            vals = rs[col].astype(float).fillna(0.0).to_numpy()
            axes[0].bar(x, vals, bottom=bottom, label=stage)
            bottom += vals
    axes[0].plot(x, lr["median_ms"].to_numpy(), "k--o", label="torch.svd_lowrank (total)")
    axes[0].set(xticks=x, xticklabels=rs["n_iter"], xlabel="power iterations n_iter", ylabel="ms (mean per call)",
                title=f"rsvd stage breakdown, {rs['matrix'].iloc[0]}, rank {rank}")
    axes[0].legend(fontsize=7)
    for name, g in (("rsvd", rs), ("torch.svd_lowrank", lr)):
        axes[1].plot(g["n_iter"], g["rel_error"], "o-", label=name)
    axes[1].set(yscale="log", xlabel="power iterations n_iter", ylabel="error / Eckart–Young optimum",
                title="Accuracy vs n_iter")
    axes[1].legend()
    fig.tight_layout()
    e = rs.set_index("n_iter")["rel_error"]
    last = rs.iloc[-1][[f"stage_{st}" for st in STAGES if f"stage_{st}" in rs]].astype(float).fillna(0.0)
    top, share = last.idxmax().removeprefix("stage_"), last.max() / last.sum()
    cap = (f"Each power iteration adds two passes over the matrix; the error over the optimum goes from "
           f"{e.iloc[0]:.3f} at n_iter={e.index[0]} to {e.iloc[-1]:.4f} at n_iter={e.index[-1]} "
           f"(rank {rank}); at n_iter={int(rs['n_iter'].iloc[-1])} the largest stage is {top} "
           f"({share:.0%} of the time).")
    return fig, cap


@figure("02_rank_sweep", "kernels_sweep/*.json")
def rank_sweep(R: Path):
    df = _kernel_rows(R / "kernels_sweep")
    q = 2 if 2 in set(df["n_iter"]) else int(df["n_iter"].max())
    d = df[df["n_iter"] == q]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, g in d.groupby("method"):
        g = g.sort_values("rank")
        axes[0].plot(g["rank"], g["median_ms"], "o-", label=method)
        if method != "full_svd":
            axes[1].plot(g["rank"], g["rel_error"], "o-", label=method)
    roof = d.groupby("rank")["roofline_ms"].first()
    axes[0].plot(roof.index, roof.values, "k:", label="roofline bound (rsvd passes)")
    axes[0].set(yscale="log", xlabel="rank", ylabel="median ms", title=f"Time vs rank (n_iter={q})")
    axes[1].set(xlabel="rank", ylabel="error / optimum", title="Accuracy vs rank")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    rs = d[d["method"] == "rsvd"].set_index("rank").sort_index()
    gap = (rs["median_ms"] / roof.reindex(rs.index)).median()
    full = d[d["method"] == "full_svd"]["median_ms"]
    cap = (f"Measured rsvd time / roofline bound ((2q+2) passes over A at the bandwidth and FLOPS measured in the same "
           f"run; the exact Gram path can need fewer): median {gap:.2f} on "
           f"{d['matrix'].iloc[0]}, from {rs['median_ms'].iloc[0]:.1f} ms at rank {rs.index[0]} to "
           f"{rs['median_ms'].iloc[-1]:.1f} ms at rank {rs.index[-1]}; the full SVD takes {full.min():.1f}–"
           f"{full.max():.1f} ms whatever rank is kept.")
    return fig, cap


# ------------------------------------------------------------------ notebook 03: compressibility

def _comp(R: Path) -> pd.DataFrame:
    df = pd.read_csv(R / "analysis/compressibility.csv")
    df["kind_label"] = df["kind"].map(KIND_LABELS)
    return df


@figure("03_group_size", "analysis/compressibility.csv")
def group_size(R: Path):
    df = _comp(R)
    d = df[(df["method"] != "pca") & (df["factor_dtype"] == df["factor_dtype"].iloc[0])]
    kinds = [k for k in ("k_pre", "v") if k in set(d["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        g = d[d["kind"] == kind]
        sns.lineplot(g, x="target_ratio", y="attn_error", hue="group_size", marker="o", ax=ax, palette="viridis",
                     errorbar=None)
        ax.set(xscale="log", xlabel="× fewer bytes (factors held vs dense)", ylabel="relative attention-output error",
               title=f"{KIND_LABELS[kind]}: layers per group (equal bytes)")
        _ratio_axis(ax)
        ax.legend(title="G")
    fig.tight_layout()
    m = d[d["target_ratio"] == 4].groupby(["kind", "group_size"])["attn_error"].mean()
    parts = [f"{KIND_LABELS[k]} {m.get((k, 1), np.nan):.3f} (G=1) → {m.get((k, m.loc[k].index.max()), np.nan):.3f} "
             f"(G={m.loc[k].index.max()})" for k in kinds
             if k in m.index.get_level_values(0) and 4 in set(d['target_ratio'])]
    cap = ("Mean over layers of the relative error of attention outputs (last queries, causal) when one matrix is "
           "compressed, at equal bytes. At 4×: " + "; ".join(parts)
           + (". Sharing one token factor across more layers buys rank and lowers the error."
              if all(m.get((k, m.loc[k].index.max()), 1) < m.get((k, 1), 0) for k in kinds)
              else ". Larger groups do not lower the error for every kind here."))
    return fig, cap


@figure("03_kinds_and_rope", "analysis/compressibility.csv")
def kinds_and_rope(R: Path):
    df = _comp(R)
    d = df[(df["method"] != "pca") & (df["factor_dtype"] == df["factor_dtype"].iloc[0])]
    gs = sorted(set(d["group_size"]))
    d = d[d["group_size"].isin([gs[0], gs[-1]])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col in zip(axes, ("recon_error", "attn_error")):
        sns.lineplot(d, x="target_ratio", y=col, hue="kind_label", style="group_size", marker="o", ax=ax,
                     errorbar=None)
        ax.set(xscale="log", xlabel="× fewer bytes", ylabel=col.replace("_", " "),
               title="reconstruction ‖X̂−X‖/‖X‖" if col == "recon_error" else "attention-output error")
        _ratio_axis(ax)
    fig.tight_layout()
    m = d[d["group_size"] == gs[0]].groupby(["kind", "target_ratio"])["attn_error"].mean()
    r = sorted(set(d["target_ratio"]))[len(set(d["target_ratio"])) // 2]
    cap = (f"At {r}× and G={gs[0]}: attention error {m.get(('k_pre', r), np.nan):.3f} with pre-RoPE keys vs "
           f"{m.get(('k_post', r), np.nan):.3f} post-RoPE, and {m.get(('v', r), np.nan):.3f} for values. "
           + ("Pre-RoPE keys compress better: un-rotate, compress, re-rotate on read."
              if m.get(("k_pre", r), 1) < m.get(("k_post", r), 0) else "Post-RoPE keys do as well here."))
    return fig, cap


@figure("03_bytes_error_frontier", "analysis/compressibility.csv")
def frontier(R: Path):
    df = _comp(R)
    d = df[df["method"] != "pca"].groupby(["kind_label", "kind", "group_size", "factor_dtype", "target_ratio"],
                                          as_index=False)[["ratio", "attn_error"]].mean()
    kinds = [k for k in ("k_pre", "v") if k in set(d["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        g = d[d["kind"] == kind]
        sns.scatterplot(g, x="ratio", y="attn_error", hue="factor_dtype", style="group_size", ax=ax, s=50)
        ax.set(xscale="log", yscale="log", xlabel="× fewer bytes (bytes actually held)",
               ylabel="attention-output error", title=f"{KIND_LABELS[kind]}: bytes vs error")
        _ratio_axis(ax)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    at = min(set(d["target_ratio"]), key=lambda r: abs(r - 4))
    best = d[d["target_ratio"] == at].sort_values("attn_error").groupby("kind").first()
    cap = ("Every point is a (G, factor dtype, rank) choice with its bytes counted from the stored tensors. Best at "
           f"{at:g}×: " + "; ".join(
               f"{KIND_LABELS[k]} G={int(r.group_size)} {r.factor_dtype} ({r.attn_error:.3f})"
               for k, r in best.iterrows()) + ". Quantised factors spend the saved bytes on rank.")
    return fig, cap


@figure("03_pca_vs_svd", "analysis/compressibility.csv")
def pca_vs_svd(R: Path):
    df = _comp(R)
    d = df[(df["group_size"] == 1) & (df["method"].isin(["svd", "pca"])) & (df["kind"] != "k_post")
           & (df["factor_dtype"] == df["factor_dtype"].iloc[0])]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(d, x="target_ratio", y="attn_error", hue="kind_label", style="method", marker="o", ax=ax,
                 errorbar=None)
    ax.set(xscale="log", xlabel="× fewer bytes", ylabel="attention-output error",
           title="Calibrated PCA (fixed bases) vs per-prompt SVD, per layer")
    _ratio_axis(ax)
    m = d.groupby(["method", "kind"])["attn_error"].mean()
    has_pca = "pca" in set(d["method"])
    cap = ("PCA bases calibrated on other text cost no SVD at run time; " + (
        f"averaged over ratios the error is {m.get(('pca', 'k_pre'), np.nan):.3f} vs "
        f"{m.get(('svd', 'k_pre'), np.nan):.3f} (keys) and {m.get(('pca', 'v'), np.nan):.3f} vs "
        f"{m.get(('svd', 'v'), np.nan):.3f} (values) for per-prompt SVD at the same bytes."
        if has_pca else "no PCA rows were computed in this run."))
    return fig, cap


@figure("03_rate_distortion", "analysis/rate_distortion.csv")
def rate_distortion(R: Path):
    from .analysis import RD_METHODS, at_budget
    df = pd.read_csv(R / "analysis/rate_distortion.csv")
    kinds = list(dict.fromkeys(df["kind"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    scalar = [m for m in RD_METHODS if not m.endswith(", vector codes")]
    for ax, kind in zip(axes[0], kinds):
        d = df[df["kind"] == kind]
        for method in RD_METHODS:
            g = d[d["method"] == method].sort_values("bits_per_entry")
            if g.empty:  # e.g. no calibrated basis was measured
                continue
            base = method.removesuffix(", vector codes")  # vector codes: dashed, in their scalar coder's colour
            style = "-" if method == "Gaussian bound" else "--o" if base != method else "-o"
            color = "black" if method == "Gaussian bound" else plt.cm.tab10(scalar.index(base) % 10)
            ax.plot(g["bits_per_entry"], g["rel_error"], style, color=color, label=method, markersize=4)
        ax.set(xscale="log", yscale="log", xlabel="bits per entry (a 16-bit cache holds 16)",
               ylabel="relative error ‖X̂−X‖/‖X‖", title=KIND_LABELS[kind], xlim=(0.3, 12))
        ax.set_xticks([0.5, 1, 2, 4, 8], ["0.5", "1", "2", "4", "8"])
        ax.minorticks_off()
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    two = at_budget(df, 2)

    def variants(k: str) -> str:  # the other bases' and codes' errors, where they were measured
        on = [f"{name} {two.at[method, k]:.3f}" for method, name in (
            ("transform, vector codes", "vector codes"),
            ("transform, calibrated basis", "calibrated basis"),
            ("transform, calibrated basis, prompt mean", "calibrated basis around the prompt's mean"),
            ("transform, calibrated basis, vector codes", "calibrated basis with vector codes"),
            ("transform, the prompt's own basis uncounted", "the prompt's own basis uncounted"),
            ("transform, the prompt's own basis uncounted, vector codes", "the same with vector codes"))
            if two.at[method, k] == two.at[method, k]]
        return f" ({', '.join(on)})" if on else ""
    cap = (f"One group of layers {df['layers'].iloc[0]} ({int(df['tokens'].iloc[0])} tokens of prose), K pre-RoPE and "
           "V each as one matrix; bits per entry from the bytes each code holds (a calibrated basis is held once per "
           "model, outside them); dashed: the same coder with vector codes below 3 bits per entry (one codebook "
           "index per run of 4 or 8 tokens of a column). Within 2 bits per entry (8× fewer bytes than 16-bit) the "
           "error is " + "; ".join(
               f"{KIND_LABELS[k]}: transform {two.at['transform', k]:.3f}" + variants(k)
               + f", truncation {two.at['truncation', k]:.3f}, Gaussian bound {two.at['Gaussian bound', k]:.3f}"
               for k in kinds)
           + ". Per-token and per-channel int quantisation have points at 4 and 8 bits only.")
    return fig, cap


@figure("03_basis_vs_context", "analysis/basis_by_context.csv")
def basis_vs_context(R: Path):
    df = pd.read_csv(R / "analysis/basis_by_context.csv")
    kinds = list(dict.fromkeys(df["kind"]))
    bits, lengths = sorted(set(df["target_bits"])), sorted(set(df["tokens"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds) + 2, 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for basis, color in (("per prompt", "C0"), ("calibrated", "C1")):
            for b, style in zip(bits, ("-o", "--s", ":^", "-.v")):
                g = df[(df["kind"] == kind) & (df["basis"] == basis) & (df["target_bits"] == b)].sort_values("tokens")
                ax.plot(g["tokens"], g["rel_error"], style, color=color, label=f"{basis}, {b:g} bits per entry",
                        markersize=4)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="relative error ‖X̂−X‖/‖X‖",
               title=KIND_LABELS[kind])
        ax.set_xticks(lengths, [str(t) for t in lengths])
        lo, hi = ax.get_ylim()
        ax.set_yticks([t for t in (0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1) if lo <= t <= hi])
        ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
        ax.minorticks_off()
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    mid = bits[len(bits) // 2]
    at = df[df["target_bits"] == mid].pivot_table(index=["kind", "tokens"], columns="basis", values="rel_error")

    def wins(kind: str) -> str:
        won = [t for t in lengths if at.at[(kind, t), "calibrated"] < at.at[(kind, t), "per prompt"]]
        return "every length" if won == lengths else (", ".join(map(str, won)) + " tokens" if won else "no length")

    cal = df[df["basis"] == "calibrated"]["calibration_bytes"].max()
    cap = (f"Transform coder on one group of layers {df['layers'].iloc[0]} of SmolLM2 (shipped prose), K pre-RoPE and "
           f"V each as one matrix, at {', '.join(f'{b:g}' for b in bits)} bits per entry held by the prompt. The basis "
           f"is fitted per prompt (its int8 rows held in the prompt's bytes) or calibrated once on "
           f"{int(df['calib_tokens'].iloc[0])} tokens of other prose ({cal / 2**20:.2f} MiB per group and kind, held "
           f"once per model, not counted in a prompt's bytes). At {mid:g} bits the calibrated basis has the lower error "
           f"(lengths {lengths[0]}–{lengths[-1]}) at " + "; ".join(f"{KIND_LABELS[k]}: {wins(k)}" for k in kinds)
           + (f"; at {lengths[-2]} tokens " + "; ".join(
               f"{KIND_LABELS[k]} {at.at[(k, lengths[-2]), 'calibrated']:.3f} calibrated vs "
               f"{at.at[(k, lengths[-2]), 'per prompt']:.3f} per prompt" for k in kinds) if len(lengths) > 1 else "")
           + ".")
    return fig, cap


# ---------------------------------------------------------------- notebook 04: RULER and latency

def _eval(R: Path) -> pd.DataFrame:
    from .results import load_results
    from .report import tidy
    frames = [load_results(p) for p in sorted((R / "eval").glob("*.jsonl"))]
    return tidy(pd.concat([f for f in frames if not f.empty], ignore_index=True))


@figure("04_pareto_accuracy_vs_bytes", "eval/*.jsonl")
def pareto(R: Path):
    df = _eval(R)
    tasks = sorted(set(df["task"]))
    per = df.groupby(["task", "label", "family"], as_index=False).agg(score=("score", "mean"),
                                                                     ratio=("kv_ratio", "mean"))
    avg = per.groupby(["label", "family"], as_index=False).agg(score=("score", "mean"), ratio=("ratio", "mean"))
    avg["task"] = "average"
    panels = [*tasks, "average"]
    data = pd.concat([per, avg])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], panels):
        g = data[data["task"] == task]
        sns.scatterplot(g, x="ratio", y="score", hue="family", style="family", s=70, ax=ax)
        top = g[g["family"] != "dense"].sort_values(["score", "ratio"], ascending=False).groupby("family").head(1)
        for _, r in top.iterrows():
            ax.annotate(r["label"], (r["ratio"], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="× fewer KV bytes than a 16-bit dense cache (measured)", ylabel="RULER score (0–100)",
               title=task)
        _ratio_axis(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    best = avg[avg["ratio"] >= 1.5].sort_values(["score", "ratio"], ascending=False).groupby("family").first()
    dense = avg.loc[avg["family"] == "dense", "score"]
    n = df.groupby("label")["index"].count().min()
    cap = (f"Mean score over samples (≥{n} per point, context {sorted(set(df['context_length']))} tokens, SmolLM2-135M "
           f"in FP32, whose dense cache holds 0.5× against 16-bit). Dense {dense.iloc[0]:.0f}; best of each family at "
           "≥1.5× fewer bytes than 16-bit: " + "; ".join(
               f"{fam} {r['label']} {r['score']:.0f} ({r['ratio']:.1f}×)" for fam, r in best.iterrows()
               if fam != "dense") + ".")
    return fig, cap


@figure("04_all_methods", "eval/*.jsonl")
def all_methods(R: Path):
    df = _eval(R)
    agg = df.groupby(["label", "family"], as_index=False).agg(
        score=("score", "mean"), ratio=("kv_ratio", "mean"), compress_ms=("compress_ms", "median"),
        decode_ms=("decode_ms_per_token", "median"), prefill_ms=("prefill_ms", "median")).sort_values("ratio")
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.32 * len(agg) + 1.5), sharey=True)
    y = np.arange(len(agg))
    colors = dict(zip(sorted(set(agg["family"])), sns.color_palette(n_colors=len(set(agg["family"])))))
    c = [colors[f] for f in agg["family"]]
    axes[0].barh(y, agg["score"], color=c)
    axes[0].set(yticks=y, yticklabels=[f"{lbl} ({r:.1f}×)" for lbl, r in zip(agg["label"], agg["ratio"])],
                xlabel="RULER score (0–100)", title="accuracy")
    axes[1].barh(y, agg["compress_ms"].fillna(0), color=c)
    axes[1].set(xlabel="compression ms (median, whole cache)", title="compression latency")
    axes[2].barh(y, agg["decode_ms"], color=c)
    axes[2].set(xlabel="decode ms / token (median)", title="decode latency")
    for ax in axes[1:]:
        ax.tick_params(axis="y", length=0)
    axes[0].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    svd_fns = df[(df["family"] == "kvsvd") & df["svd_fn"].ne("rsvd")]
    extra = ""
    if not svd_fns.empty:
        same = df[df["label"].isin(set(svd_fns["label"]))].groupby("svd_fn")[["score", "compress_ms"]].mean()
        r = df[(df["family"] == "kvsvd") & (df["svd_fn"] == "rsvd")]
        extra = " Same group/ratio with other SVD functions: " + "; ".join(
            f"{fn} {row.score:.0f} in {row.compress_ms:.0f} ms" for fn, row in same.iterrows()) + \
            f" (rsvd rows: median {r['compress_ms'].median():.0f} ms)."
    cap = ("Every method side by side (labels give the measured × fewer bytes than a 16-bit dense cache, and for rsvd the "
           "SVD path its matrices ran): accuracy, the one-off compression after prefill, and per-token decode latency "
           "on this CPU." + extra)
    return fig, cap


def _stacked_stages(ax, g: pd.DataFrame, x: np.ndarray) -> None:
    bottom = np.zeros(len(g))
    for stage in STAGES:
        col = f"stage_{stage}"
        if col in g:
            vals = g[col].astype(float).fillna(0.0).to_numpy()
            ax.bar(x, vals, bottom=bottom, label=stage)
            bottom += vals


def _sweep(R: Path, key: str, select) -> tuple[plt.Figure, pd.DataFrame]:
    df = _eval(R)
    d = df[select(df)]
    stage_cols = [c for c in d if c.startswith("stage_")]
    g = d.groupby(key, as_index=False).agg(score=("score", "mean"), ratio=("kv_ratio", "mean"), n=("score", "size"),
                                          **{c: (c, "median") for c in stage_cols}).sort_values(key)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(g))
    _stacked_stages(axes[0], g, x)
    axes[0].set(xticks=x, xticklabels=g[key], xlabel=key, ylabel="compression ms (median over cells, all groups)",
                title="compression time by rsvd stage")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, g["score"], "o-")
    axes[1].set(xticks=x, xticklabels=g[key], xlabel=key, ylabel="RULER score (0–100)", ylim=(-5, 105),
                title="accuracy")
    fig.tight_layout()
    return fig, g


@figure("04_n_iter_sweep", "eval/*.jsonl")
def eval_n_iter(R: Path):
    df = _eval(R)
    counts = df[(df["m_method"] == "xkv") & (df["svd_fn"] == "rsvd")].groupby(
        ["m_layer_group_size", "budget"])["n_iter"].nunique()
    G, budget = counts.idxmax()
    select = ((df["m_method"] == "xkv") & (df["m_layer_group_size"] == G) & (df["budget"] == budget)
              & (df["svd_fn"] == "rsvd") & (df["key_space"] == "pre_rope"))
    fig, g = _sweep(R, "n_iter", lambda d: select)
    fig.axes[0].set_title(f"xKV G={G:g} at {budget}: compression time by stage")
    sc = dict(zip(g["n_iter"], g["score"]))
    ran = df[select].groupby("n_iter")["svd_ran"].first()
    cap = (f"xKV G={G:g} at {budget} fewer bytes (mean measured ratio against 16-bit "
           f"{df.loc[select, 'kv_ratio'].mean():.2f}×). Accuracy by n_iter, with the SVD path its matrices ran: "
           + ", ".join(f"{int(k)}: {v:.0f} ({ran[k]})" for k, v in sc.items())
           + f" (≥{g['n'].min()} cells each). A matrix on the exact Gram path runs no power iteration, whatever "
           "n_iter asks for.")
    return fig, cap


@figure("04_layer_group_sweep", "eval/*.jsonl")
def eval_groups(R: Path):
    df = _eval(R)
    lowrank = df[df["m_method"].isin(["svd", "xkv"]) & (df["svd_fn"] == "rsvd") & (df["n_iter"] == 2)]
    budget = lowrank.groupby("budget")["group_size"].nunique().idxmax()
    select = (df["m_method"].isin(["svd", "xkv"]) & (df["svd_fn"] == "rsvd") & (df["n_iter"] == 2)
              & (df["budget"] == budget) & (df["factor_dtype"] == lowrank["factor_dtype"].mode()[0]))
    fig, g = _sweep(R, "group_size", lambda d: select)
    fig.axes[0].set_title(f"{budget} fewer bytes: compression time by stage")
    ran = df[select].groupby("group_size")["svd_ran"].first()
    cap = (f"At {budget} fewer bytes (mean measured ratio against 16-bit {df.loc[select, 'kv_ratio'].mean():.2f}×), "
           "accuracy by layers per group, with the SVD path each ran: " + ", ".join(
               f"G={int(k)}: {s:.0f} ({ran[k]})" for k, s in zip(g["group_size"], g["score"]))
           + ". Larger groups hold more rank for the same bytes; their SVD is wider, so compression costs more.")
    return fig, cap


@figure("04_decode_vs_context", "cache/*.json")
def decode_vs_context(R: Path):
    rows, stages = [], []
    for path in sorted((R / "cache").glob("*.json")):
        p = json.loads(path.read_text())
        for name, r in p["results"].items():
            rows.append({"config": name, "context": p["context_tokens"], "tok_s": r["decode_tokens_per_s"],
                         "ms_median": r.get("decode_ms_median", r["decode_ms_per_token"]),
                         "ratio": r["memory"]["ratio"], "device": p["device"]})
            log = r.get("compression_log", [])
            if log:
                per = {s: sum(e["breakdown_ms"].get(s, 0.0) for e in log) / len(log) for s in STAGES}
                stages.append({"config": name, "context": p["context_tokens"], **per})
    df = pd.DataFrame(rows)
    main = df[~df["config"].str.contains("_q")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sns.lineplot(main, x="context", y="tok_s", hue="config", marker="o", ax=axes[0])
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="decode tokens / s (batch 1)",
                title=f"Decode speed vs context ({df['device'].iloc[0]})")
    axes[0].legend(fontsize=7)
    st = pd.DataFrame(stages)
    st = st[~st["config"].str.contains("_q")].sort_values(["config", "context"])
    x = np.arange(len(st))
    _stacked_stages(axes[1], st.rename(columns={s: f"stage_{s}" for s in STAGES}), x)
    axes[1].set(xticks=x, xticklabels=[f"{c} @{t}" for c, t in zip(st["config"], st["context"])],
                ylabel="ms per layer group (mean)", title="compression latency per group by stage")
    axes[1].tick_params(axis="x", rotation=75, labelsize=6)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    longest = df["context"].max()
    at = df[df["context"] == longest].set_index("config")
    cap = (f"At {longest} tokens: dense {at.loc['dense', 'tok_s']:.1f} tok/s; " + ", ".join(
        f"{c} {r.tok_s:.1f} ({r.ratio:.1f}× fewer bytes)" for c, r in at.iterrows() if c != "dense" and "_q" not in c)
        + ". Decoding here rebuilds dense K/V from the factors at every step (reconstruct-on-read)"
        + (", so compression saves memory but costs decode time."
           if (at.drop("dense")["tok_s"] < at.loc["dense", "tok_s"]).all() else "."))
    return fig, cap


@figure("04_attention_paths", "attention/*.json")
def attention_paths(R: Path):
    rows = []
    for path in sorted((R / "attention").glob("*.json")):
        p = json.loads(path.read_text())
        c, fewer = p["config"], p["results"]["factors"]["kv_ratio"]
        for name, r in p["results"].items():
            rows.append({"context": p["context_tokens"], "key_space": c["key_space"], "path": name,
                         "ms": r["ms_per_token_median"], "ratio": r["kv_ratio"], "device": p["device"],
                         "where": f"{p['model']} {p['context_tokens']} tok,\n{c['method']} G={c['layer_group_size']} "
                                  f"{c['key_space']} {fewer:.1f}×"})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(max(8.0, 2.3 * df["where"].nunique()), 4.5))
    sns.barplot(df, x="where", y="ms", hue="path", ax=ax)
    ax.tick_params(axis="x", labelsize=8)
    ax.set(xlabel="context and compressed cache", ylabel="decode ms / token (median)",
           title=f"Attention from the factors vs dense and reconstruct-on-read ({df['device'].iloc[0]})")
    ms = df.pivot_table(index="where", columns="path", values="ms")
    cap = "; ".join(f"{w}: factors {r['dense'] / r['factors']:.2f}× dense speed, {r['reconstruct'] / r['factors']:.2f}× "
                    f"reconstruct-on-read, at {df[(df['where'] == w) & (df['path'] == 'factors')]['ratio'].iloc[0]:.1f}× "
                    "fewer KV bytes" for w, r in ms.iterrows()) + "."
    return fig, "Same tokens, same compressed cache, three attention paths. " + cap


@figure("04_decode_speed", "decode/*.json")
def decode_speed(R: Path):
    from .gridspec import family
    rows = []
    for path in sorted((R / "decode").glob("*.json")):
        p = json.loads(path.read_text())
        for name, r in p["results"].items():
            rows.append({"label": name, "context": p["context_tokens"], "tok_s": r["tokens_per_s"],
                         "vs_dense": r["vs_dense"], "kv_ratio": r["kv_ratio"], "family": family(r["method"]["method"]),
                         "asked": r["method"].get("ratio", 0), "rebuilt": name.endswith("rebuilt K/V"),
                         "where": f"{p['model']} {p['dtype'].removeprefix('torch.')}, batch 1, {p['device']}, "
                                  f"{p['threads']} threads"})
    df = pd.DataFrame(rows)
    panels = sorted(set(df["asked"]))
    dense = df[df["label"] == "dense"].sort_values("context")
    colors = dict(zip(sorted(set(df["family"])), sns.color_palette(n_colors=df["family"].nunique())))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), sharex=True, squeeze=False)
    for ax, asked in zip(axes[:, 0], panels):
        ax.plot(dense["context"], dense["tok_s"], "k-o", lw=2, label="dense (DynamicCache)")
        for name, g in df[(df["asked"] == asked) & (df["label"] != "dense")].groupby("label", sort=False):
            g = g.sort_values("context")
            ax.plot(g["context"], g["tok_s"], "--" if g["rebuilt"].iloc[0] else "-", marker="o", ms=4,
                    color=colors[g["family"].iloc[0]], label=f"{name} ({g['kv_ratio'].iloc[-1]:.1f}×)")
        ax.set(xscale="log", xlabel="context tokens", ylabel="decode tokens / s (batch 1)", ylim=(0, None),
               title=f"{asked:g}× asked" if asked else "no ratio asked (dense, 4-bit quantisation)")
        ax.set_xticks(sorted(set(df["context"])), [str(c) for c in sorted(set(df["context"]))])
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    longest = df["context"].max()
    at = df[(df["context"] == longest) & (df["label"] != "dense")].sort_values("vs_dense", ascending=False)
    cap = (f"Decode speed of every method against the dense cache of the same run (median step of teacher-forced "
           f"tokens, {df['where'].iloc[0]}); a kvsvd "
           "cache decodes from its factors or codes (kvsvd attention, solid) and from K/V rebuilt each step (dashed); "
           f"the legend gives the measured ratio of 16-bit bytes to bytes held. At {longest} tokens dense runs "
           f"{dense['tok_s'].iloc[-1]:.1f} tok/s; " + ", ".join(
               f"{r.label} {r.vs_dense:.2f}× dense at {r.kv_ratio:.1f}×" for r in at.itertuples()) + ".")
    return fig, cap


@figure("04_target_grid", "eval_targets/*.jsonl")
def target_grid(R: Path):
    from .results import load_results
    from .report import headline, score_table, task_columns, tidy
    df = tidy(pd.concat([load_results(p) for p in sorted((R / "eval_targets").glob("*.jsonl"))], ignore_index=True))
    lengths = sorted(set(df["context_length"]))
    tables = {L: score_table(df, L) for L in lengths}
    n_rows = max(len(t) for t in tables.values())
    fig, axes = plt.subplots(len(lengths), 2, figsize=(15, (0.28 * n_rows + 1.2) * len(lengths)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip(sorted(set(df["family"])), sns.color_palette(n_colors=df["family"].nunique())))
    caps = []
    for (heat, delta), L in zip(axes, lengths):
        t = tables[L]
        tasks = task_columns(t)
        names = [f"{lbl} ({r:.1f}×)" for lbl, r in zip(t.index, t["ratio"])]
        sns.heatmap(t[tasks].set_axis(names), annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=100, cbar=False,
                    ax=heat, annot_kws={"fontsize": 7})
        heat.set(title=f"{L} tokens: mean score per task (n ≥ {int(t['n'].min())} samples each)", ylabel="")
        heat.tick_params(axis="y", labelsize=7)
        y = np.arange(len(t)) + 0.5
        err = np.vstack([t["delta"] - t["delta_lo"], t["delta_hi"] - t["delta"]])
        for fam in t["family"].unique():
            m = (t["family"] == fam).to_numpy()
            delta.errorbar(t["delta"][m], y[m], xerr=err[:, m], fmt="o", color=colors[fam], label=fam, ms=4, capsize=2)
        delta.axvline(0, color="k", lw=0.8)
        delta.axvline(-2, color="k", lw=0.8, ls=":")
        delta.set(ylim=(len(t), 0), yticks=[], xlabel="average minus dense (points), 95% bootstrap CI",
                  title="paired difference to dense (dotted: the −2 goal)")
        delta.legend(fontsize=7, loc="lower right")
        h = headline(t)
        caps.append(f"{L} tokens, dense {t.at['dense', 'average']:.1f}: " + "; ".join(
            f"≈{target:g}× " + ", ".join(f"{r['family']} {r['average']:.1f} ({r['ratio']:.2f}×, Δ {r['delta_lo']:+.0f} to "
                                         f"{r['delta_hi']:+.0f})" for _, r in g.iterrows())
            for target, g in h.groupby("target")))
    fig.tight_layout()
    return fig, ("Target grid: every method on the same samples (SmolLM2-135M in FP32; headline average over the six "
                 "needle tasks, vt reported, not averaged; ratios are measured against a 16-bit dense cache). Best of "
                 "each family at matched ratios, with the paired 95% interval against dense: " + " | ".join(caps) + ".")


def _series(label: str) -> str:
    """A method's label without its budget (``4x``, a quantiser's ``int4`` or ``3-bit``) and without the
    paths that ran (they differ between budgets; the report lists them): the line its ratios are points of."""
    label = label.split(" → ")[0]
    return re.sub(r" \d+(\.\d+)?x(?= |$)| int\d$| \d-bit$", "", label)


@figure("04_frontier", "eval_frontier/*.jsonl")
def frontier_grid(R: Path):
    from .results import load_results
    from .report import headline, score_table, tidy
    df = tidy(pd.concat([load_results(p) for p in sorted((R / "eval_frontier").glob("*.jsonl"))], ignore_index=True))
    lengths = sorted(set(df["context_length"]))
    fig, axes = plt.subplots(1, len(lengths), figsize=(7.5 * len(lengths) + 3, 4.5), squeeze=False)
    tables = {L: score_table(df, L) for L in lengths}
    names = sorted({_series(lbl) for t in tables.values() for lbl in t[t["family"] != "dense"].index})
    palette = sns.color_palette("tab20")  # one colour and marker per method in every panel: 20 colours, then a new marker
    style = {name: (palette[i % 20], "os^D"[i // 20 % 4]) for i, name in enumerate(names)}
    caps, handles = [], {}
    for ax, L in zip(axes[0], lengths):
        t = tables[L]
        t = t[t["family"] != "dense"].assign(series=[_series(lbl) for lbl in t[t["family"] != "dense"].index])
        for name, g in t.sort_values("ratio").groupby("series", sort=False):
            color, marker = style[name]
            handles[name] = ax.errorbar(g["ratio"], g["delta"], yerr=np.vstack([g["delta"] - g["delta_lo"],
                                                                                g["delta_hi"] - g["delta"]]),
                                        fmt="-" + marker, color=color, ms=4, capsize=2, label=name)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="measured × fewer bytes than a 16-bit cache",
               ylabel="average score minus dense (points), 95% CI",
               title=f"{L} tokens (n ≥ {int(t['n'].min())} samples per task)")
        _ratio_axis(ax)
        h = headline(t)
        caps.append(f"{L} tokens: " + "; ".join(
            f"≈{r['target']:g}× {r['method'].split(' → ')[0]} {r['average']:.1f} "
            f"(Δ {r['delta']:+.1f} [{r['delta_lo']:+.1f}, {r['delta_hi']:+.1f}])" for _, r in h.iterrows()))
    axes[0][-1].legend([handles[n] for n in names if n in handles], [n for n in names if n in handles], fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.02, 1))
    calibrated = ("A calibrated basis (held once per model, shared by every sequence) is not in a sequence's "
                  "ratio; the report gives its size and each row's all-in ratio. ") if (
        df["m_basis"].eq("calibrated").any() if "m_basis" in df else False) else ""
    return fig, ("Each line is one method over its budgets, at the ratio it measured (context, question and answer "
                 "tokens all counted); the paired difference to the FP32 dense cache on the same samples, averaged "
                 "over the needle tasks. " + calibrated + "Best per family at each target ratio (at most 15% more "
                 "bytes, or up to 30% fewer) — " + " ".join(caps))

