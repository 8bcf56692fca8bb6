"""Tables of a grid's results: mean RULER score per method × task, and the issue-4 goal checks.

``python -m kvsvd report results/eval_targets/cpu_targets.jsonl`` prints, per context length, one
markdown table (rows: methods with their measured × fewer KV bytes; columns: tasks, the mean
over the headline tasks, its paired difference to dense with a 95% bootstrap interval, the gold
answer's mean negative log-likelihood per token under teacher forcing, samples per task) and the goals: at ≈4× fewer bytes the best kvsvd
method (rsvd, n_iter=2) within 2 points of dense and ahead of every kvpress press, and n_iter=2
as accurate as the exact SVD on the same configuration (their paired difference with its 95% interval).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FAMILY = {"none": "dense", "press": "kvpress", "quantized": "quantized cache", "svd": "kvsvd", "xkv": "kvsvd",
          "minicache": "kvsvd", "pca": "kvsvd"}
REPORTED_ONLY = ("vt",)  # SmolLM2 scores ~0 on vt even dense: reported, not averaged into the headline


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """``grid.load_results`` rows with derived columns: family, n_iter, svd_fn, key_space,
    requested (the ratio asked for), group_size; one row per (label, task, length, sample)."""
    df = df.copy()
    df["family"] = df["m_method"].map(FAMILY)
    df["n_iter"] = df["m_n_iter"].fillna(2).astype(int) if "m_n_iter" in df else 2
    df["svd_fn"] = df["m_svd"].fillna("rsvd") if "m_svd" in df else "rsvd"
    df["key_space"] = df["m_key_space"].fillna("pre_rope") if "m_key_space" in df else "pre_rope"
    df["requested"] = df["m_ratio"] if "m_ratio" in df else np.nan
    default_g = df["m_method"].map({"svd": 1, "pca": 1, "minicache": 2, "xkv": 4})
    df["group_size"] = df["m_layer_group_size"].fillna(default_g) if "m_layer_group_size" in df else default_g
    return df.drop_duplicates(subset=["label", "task", "context_length", "index"])


def score_table(df: pd.DataFrame, context_length: int) -> pd.DataFrame:
    """Rows: methods (dense first, then by measured ratio); columns: mean score per task, ``average``
    over the headline tasks, ``ratio`` (mean measured × fewer bytes) and ``n`` (fewest samples of any
    task). Only samples that every method has finished count, so all rows average the same samples."""
    d = finished(df, context_length)
    per = d.pivot_table(index="label", columns="task", values="score", aggfunc="mean")
    headline = headline_tasks(d)
    table = per[headline + [t for t in per.columns if t in REPORTED_ONLY]].copy()
    table["average"] = per[headline].mean(axis=1)
    table = table.join(paired_delta(d, headline))
    if "gold_logprob" in d:
        nll = -(d["gold_logprob"] / d["gold_tokens"])
        table["gold_nll"] = nll[d["task"].isin(headline)].groupby([d["label"], d["task"]]).mean().groupby("label").mean()
    table["ratio"] = d.groupby("label")["kv_ratio"].mean()
    table["n"] = d.groupby(["label", "task"]).size().groupby("label").min()
    table["family"] = d.groupby("label")["family"].first()
    order = table.assign(dense=table["family"] != "dense").sort_values(["dense", "ratio", "average"],
                                                                       ascending=[True, True, False])
    return order.drop(columns="dense")


def finished(df: pd.DataFrame, context_length: int) -> pd.DataFrame:
    """Rows at ``context_length`` of the (task, sample) pairs that every method has finished."""
    d = df[df["context_length"] == context_length]
    return d[d.groupby(["task", "index"])["label"].transform("nunique") == d["label"].nunique()]


def headline_tasks(d: pd.DataFrame) -> list[str]:
    """The tasks averaged into the headline score (all but REPORTED_ONLY), sorted."""
    return sorted(t for t in set(d["task"]) if t not in REPORTED_ONLY)


def task_columns(table: pd.DataFrame) -> list[str]:
    """The per-task and ``average`` columns of a :func:`score_table`."""
    return [c for c in table.columns if c not in ("ratio", "n", "family", "delta", "delta_lo", "delta_hi", "gold_nll")]


def paired_delta(d: pd.DataFrame, headline: list[str], n_boot: int = 2000, seed: int = 0,
                 reference: str = "dense") -> pd.DataFrame:
    """Per method: ``delta`` = headline average minus the ``reference`` method's (dense unless
    told), from paired per-sample differences, and its 95% bootstrap interval ``delta_lo`` /
    ``delta_hi`` (samples resampled within each task, the same resample for every method).
    NaN without a reference row."""
    s = d[d["task"].isin(headline)].pivot_table(index=["task", "index"], columns="label", values="score")
    if reference not in s:
        return pd.DataFrame(index=s.columns, columns=["delta", "delta_lo", "delta_hi"], dtype=float)
    diff = s.sub(s[reference], axis=0)
    rng = np.random.default_rng(seed)
    boot = np.mean([g.to_numpy()[rng.integers(0, len(g), (n_boot, len(g)))].mean(1)
                    for _, g in diff.groupby(level="task")], axis=0)  # (n_boot, methods)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return pd.DataFrame({"delta": diff.groupby(level="task").mean().mean(), "delta_lo": lo, "delta_hi": hi},
                        index=diff.columns)


def goal_checks(df: pd.DataFrame, context_length: int, ratio: float = 4, table: pd.DataFrame | None = None) -> dict:
    """The issue-4 goals at ``ratio`` (requested) fewer bytes, on the headline-task average
    (``table``: this length's :func:`score_table` when the caller has it already)."""
    table = score_table(df, context_length) if table is None else table
    d = df[df["context_length"] == context_length].drop_duplicates("label").set_index("label")
    at = d.index[d["requested"] == ratio]
    kvsvd = [lbl for lbl in at if d.at[lbl, "family"] == "kvsvd" and d.at[lbl, "svd_fn"] == "rsvd"
             and d.at[lbl, "n_iter"] == 2]
    presses = [lbl for lbl in at if d.at[lbl, "family"] == "kvpress"]
    out: dict = {"context_length": context_length, "ratio": ratio,
                 "dense": float(table.loc["dense", "average"]) if "dense" in table.index else float("nan")}
    if kvsvd:
        best = table.loc[kvsvd, "average"].idxmax()
        out.update(best_kvsvd=best, best_kvsvd_score=float(table.at[best, "average"]),
                   best_kvsvd_ratio=float(table.at[best, "ratio"]))
        out["within_2_of_dense"] = out["dense"] - out["best_kvsvd_score"] <= 2
        out["best_kvsvd_delta_ci"] = (float(table.at[best, "delta_lo"]), float(table.at[best, "delta_hi"]))
    if presses:
        bp = table.loc[presses, "average"].idxmax()
        out.update(best_press=bp, best_press_score=float(table.at[bp, "average"]))
        if kvsvd:
            out["ahead_of_every_press"] = out["best_kvsvd_score"] > out["best_press_score"]
    exact = [lbl for lbl in at if d.at[lbl, "svd_fn"] == "full_svd"]
    done = finished(df, context_length) if exact else None
    for lbl in exact:  # the same configuration with rsvd n_iter=2: the label without the svd suffix
        twin = lbl.removesuffix(" full_svd")
        if twin in table.index:
            paired = paired_delta(done, headline_tasks(done), reference=lbl).loc[twin]
            out.setdefault("n_iter2_vs_exact", []).append(
                {"config": twin, "rsvd_q2": float(table.at[twin, "average"]),
                 "full_svd": float(table.at[lbl, "average"]), "delta": float(paired["delta"]),
                 "delta_ci": (float(paired["delta_lo"]), float(paired["delta_hi"]))})
    return out


def markdown(path: str | Path) -> str:
    """Every context length of a results file: its score table and goal checks, as markdown."""
    from .grid import load_results
    df = tidy(load_results(path))
    parts = []
    for L in sorted(set(df["context_length"])):
        t = score_table(df, L)
        cols = task_columns(t)
        lines = [f"### {Path(path).stem}, {L} tokens",
                 "| method | × fewer bytes | " + " | ".join(cols) + " | Δ dense [95% CI] | gold NLL/token | n |",
                 "|---|---:|" + "---:|" * len(cols) + "---:|---:|---:|"]
        lines += [f"| {lbl} | {r['ratio']:.2f} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                  + f" | {r['delta']:+.1f} [{r['delta_lo']:+.1f}, {r['delta_hi']:+.1f}] | {r.get('gold_nll', np.nan):.3f}"
                  + f" | {int(r['n'])} |" for lbl, r in t.iterrows()]
        for ratio in (4, 8):
            g = goal_checks(df, L, ratio, t)
            lines.append(f"\n≈{ratio}×: dense {g['dense']:.1f}; best kvsvd {g.get('best_kvsvd')} "
                         f"{g.get('best_kvsvd_score', float('nan')):.1f} ({g.get('best_kvsvd_ratio', float('nan')):.2f}×); "
                         f"best press {g.get('best_press')} {g.get('best_press_score', float('nan')):.1f}; "
                         f"within 2 of dense: {g.get('within_2_of_dense')} (Δ 95% CI "
                         f"{g.get('best_kvsvd_delta_ci', (np.nan, np.nan))[0]:+.1f} to "
                         f"{g.get('best_kvsvd_delta_ci', (np.nan, np.nan))[1]:+.1f}); ahead of every press: "
                         f"{g.get('ahead_of_every_press')}"
                         + "".join(f"; {e['config']}: rsvd q2 {e['rsvd_q2']:.1f} vs full_svd {e['full_svd']:.1f} "
                                   f"(paired Δ {e['delta']:+.1f}, 95% CI {e['delta_ci'][0]:+.1f} to {e['delta_ci'][1]:+.1f})"
                                   for e in g.get("n_iter2_vs_exact", [])))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
