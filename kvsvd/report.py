"""Tables of a grid's results: mean RULER score per method × task, the headline at matched
16-bit ratios, and the goal checks.

``python -m kvsvd report results/eval_targets/cpu_targets.jsonl`` prints, per context length:
- one markdown table (rows: methods with their measured ratio against a 16-bit cache and the SVD
  path their matrices ran; columns: tasks, the mean over the headline tasks, its paired difference
  to dense with a 95% bootstrap interval, the gold answer's mean negative log-likelihood per token
  under teacher forcing, samples per task);
- the headline: at each of ≈2×, 2.7×, 4×, 8× and 16× (measured, within 15%) the best method of each
  family (kvsvd truncation, kvsvd transform coding, quantisation peers, kvpress presses, 16-bit
  dense) with its paired interval;
- the goals at ≈4× and ≈8×: the best kvsvd method (truncation, and transform coding apart) within 2
  points of dense, ahead of every press and
  every quantisation peer at the same bytes (and any peer that holds no more bytes and scores higher,
  at whatever ratio), and rsvd n_iter=2 as accurate as the exact SVD on the same configuration,
  judged only on rows whose matrices all ran the randomized path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from . import gridspec
from .methods import METHODS

TARGETS = (2, 2.7, 4, 8, 16)  # headline 16-bit ratios
MATCH = 0.15  # a method is at a target ratio when it holds at most 15% more bytes, or up to 30% fewer (at_ratio)
REPORTED_ONLY = ("vt",)  # SmolLM2 scores ~0 on vt even dense: reported, not averaged into the headline


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """``grid.load_results`` rows with derived columns: family, n_iter, svd_fn, key_space, factor_dtype,
    requested (the 16-bit ratio asked for), budget (``4x``, or ``4x of fp32`` for rows budgeted against
    an FP32 cache), group_size; one row per (label, task, length, sample)."""
    df = df.copy()
    df["family"] = df["m_method"].map(gridspec.family)
    df["n_iter"] = df["m_n_iter"].fillna(2).astype(int) if "m_n_iter" in df else 2
    df["svd_fn"] = df["m_svd"].fillna("rsvd") if "m_svd" in df else "rsvd"
    df["key_space"] = df["m_key_space"].fillna("pre_rope") if "m_key_space" in df else "pre_rope"
    df["factor_dtype"] = df["m_factor_dtype"].fillna("bf16") if "m_factor_dtype" in df else "bf16"
    df["requested"] = df["m_ratio"] if "m_ratio" in df else np.nan
    budget = df["requested"].map(lambda r: f"{r:g}x" if r == r else None)
    if "m_fp32_ratio" in df:  # rows budgeted against an FP32 cache
        budget = budget.fillna(df["m_fp32_ratio"].map(lambda r: f"{r:g}x of fp32" if r == r else None))
    df["budget"] = budget
    default_g = df["m_method"].map({name: m.group_size for name, m in METHODS.items()})
    df["group_size"] = df["m_layer_group_size"].fillna(default_g) if "m_layer_group_size" in df else default_g
    return df.drop_duplicates(subset=["label", "task", "context_length", "index"])


def score_table(df: pd.DataFrame, context_length: int) -> pd.DataFrame:
    """Rows: methods (dense first, then by measured ratio); columns: mean score per task, ``average``
    over the headline tasks, ``ratio`` (mean measured × fewer bytes) and ``n`` (fewest samples of any
    task). Only samples that every method has finished count, so all rows average the same samples
    (methods a grid has only begun are left out: :func:`unfinished`)."""
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
    if "bytes_calibration" in d:  # held once per model: beside the ratio, and charged to one sequence all in
        table["calibration_mib"] = d.groupby("label")["bytes_calibration"].max().fillna(0) / 2**20
        table["ratio_all_in"] = d.groupby("label")["kv_ratio_all_in"].mean()
    table["n"] = d.groupby(["label", "task"]).size().groupby("label").min()
    table["family"] = d.groupby("label")["family"].first()
    table["svd_ran"] = d.groupby("label")["svd_ran"].first() if "svd_ran" in d else None
    order = table.assign(dense=table["family"] != "dense").sort_values(["dense", "ratio", "average"],
                                                                       ascending=[True, True, False])
    return order.drop(columns="dense")


def pairs_done(df: pd.DataFrame, context_length: int) -> pd.Series:
    """(task, sample) pairs each method has finished at ``context_length``, by label."""
    d = df[df["context_length"] == context_length]
    return d.groupby("label")[["task", "index"]].apply(lambda g: len(g.drop_duplicates()))


def unfinished(df: pd.DataFrame, context_length: int) -> pd.Series:
    """Methods left out of the tables at ``context_length`` (label → pairs finished): those with fewer than
    half the (task, sample) pairs of the most finished method, so that a method a grid has only begun
    does not cut every other method down to its few samples, and earlier variants (rows of settings no grid
    runs any more, ``kvsvd.results.earlier_variant``) short of any of those pairs, which will never finish."""
    done = pairs_done(df, context_length)
    earlier = set(df.loc[df["earlier_variant"], "label"]) if "earlier_variant" in df else set()
    return done[(done < done.max() / 2) | (done.index.isin(earlier) & (done < done.max()))]


def finished(df: pd.DataFrame, context_length: int) -> pd.DataFrame:
    """Rows at ``context_length`` of the (task, sample) pairs that every method has finished, the
    :func:`unfinished` methods left out."""
    d = df[(df["context_length"] == context_length) & ~df["label"].isin(unfinished(df, context_length).index)]
    return d[d.groupby(["task", "index"])["label"].transform("nunique") == d["label"].nunique()]


def headline_tasks(d: pd.DataFrame) -> list[str]:
    """The tasks averaged into the headline score (all but REPORTED_ONLY), sorted."""
    return sorted(t for t in set(d["task"]) if t not in REPORTED_ONLY)


def task_columns(table: pd.DataFrame) -> list[str]:
    """The per-task and ``average`` columns of a :func:`score_table`."""
    return [c for c in table.columns
            if c not in ("ratio", "n", "family", "svd_ran", "delta", "delta_lo", "delta_hi", "gold_nll",
                         "calibration_mib", "ratio_all_in")]


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


def at_ratio(table: pd.DataFrame, target: float, tol: float = MATCH) -> pd.Index:
    """Labels of a :func:`score_table` whose mean measured 16-bit ratio r is at ``target``: it holds at most ``tol``
    more bytes than the target allows (r ≥ target / (1 + tol)) and at most 2·``tol`` fewer (r ≤ target·(1 + 2·tol)):
    a timeline budget leaves unheld the room it reserved for answer tokens that a cell did not generate, so its
    measured ratio ends above the one asked for, most at high ratios (16× rows end near 19×)."""
    r = table["ratio"]
    return table.index[(r >= target / (1 + tol)) & (r <= target * (1 + 2 * tol))]


def headline(table: pd.DataFrame, targets=TARGETS) -> pd.DataFrame:
    """Per target 16-bit ratio and family (kvsvd, quantized cache, kvpress, dense 16-bit): the best
    method at that ratio (:func:`at_ratio`) with its score, measured ratio and paired Δ to dense."""
    rows = []
    for t in targets:
        at = table.loc[at_ratio(table, t)]
        for family, g in at[at["family"] != "dense"].groupby("family"):
            best = g["average"].idxmax()
            rows.append({"target": t, "family": family, "method": best,
                         **table.loc[best, ["ratio", "average", "delta", "delta_lo", "delta_hi"]].to_dict()})
    return pd.DataFrame(rows)


def goal_checks(df: pd.DataFrame, context_length: int, ratio: float = 4, table: pd.DataFrame | None = None) -> dict:
    """The goals at ``ratio`` (measured, against 16-bit, within :data:`MATCH`) on the headline-task
    average (``table``: this length's :func:`score_table` when the caller has it already)."""
    table = score_table(df, context_length) if table is None else table
    at = at_ratio(table, ratio)
    fam = table["family"]
    out: dict = {"context_length": context_length, "ratio": ratio,
                 "dense": float(table.loc["dense", "average"]) if "dense" in table.index else float("nan")}
    for key, family in (("kvsvd", "kvsvd"), ("transform", "kvsvd transform"), ("press", "kvpress"),
                        ("quantized", "quantized cache")):
        labels = [lbl for lbl in at if fam[lbl] == family]
        if labels:
            best = table.loc[labels, "average"].idxmax()
            out.update({f"best_{key}": best, f"best_{key}_score": float(table.at[best, "average"]),
                        f"best_{key}_ratio": float(table.at[best, "ratio"]),
                        f"best_{key}_delta_ci": (float(table.at[best, "delta_lo"]), float(table.at[best, "delta_hi"]))})
    for own, prefix in (("kvsvd", ""), ("transform", "transform_")):  # truncation's keys keep no prefix
        if f"best_{own}" not in out:
            continue
        score = out[f"best_{own}_score"]
        out[f"{prefix}within_2_of_dense"] = out["dense"] - score <= 2
        # a peer that holds no more bytes and scores higher, at any ratio (e.g. 4-bit quantisation at 2.7x)
        peers = table[fam.isin(["kvpress", "quantized cache"]) & (table["ratio"] >= out[f"best_{own}_ratio"])
                      & (table["average"] > score)]
        out[f"{prefix}dominated_by"] = peers["average"].idxmax() if len(peers) else None
        for key in ("press", "quantized"):
            if f"best_{key}" in out:
                out[f"{prefix}ahead_of_every_{key}"] = score > out[f"best_{key}_score"]
    done = finished(df, context_length)
    for lbl in table.index[table["svd_ran"].eq("full")] if "svd_ran" in table else []:
        # the same configuration on rsvd n_iter=2: the label without its svd suffix, run on the randomized path
        twins = [t for t in table.index if table.at[t, "svd_ran"] == "randomized" and " q2" in t.split(" → ")[0]
                 and re.sub(r" q2| qr=\S+", "", t.split(" → ")[0]) == lbl.removesuffix(" full_svd")]
        for twin in twins:
            paired = paired_delta(done, headline_tasks(done), reference=lbl).loc[twin]
            out.setdefault("n_iter2_vs_exact", []).append(
                {"config": twin, "rsvd_q2": float(table.at[twin, "average"]), "full_svd": float(table.at[lbl, "average"]),
                 "delta": float(paired["delta"]), "delta_ci": (float(paired["delta_lo"]), float(paired["delta_hi"]))})
    return out


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:+.1f}, {hi:+.1f}]"


def _best(g: dict, key: str) -> str:
    if f"best_{key}" not in g:
        return "none at this ratio"
    return (f"{g[f'best_{key}']} {g[f'best_{key}_score']:.1f} ({g[f'best_{key}_ratio']:.2f}×, Δ "
            f"{_ci(*g[f'best_{key}_delta_ci'])})")


def markdown(path: str | Path) -> str:
    """Every context length of a results file: its score table, headline and goal checks, as markdown."""
    from .results import load_results
    df = tidy(load_results(path))
    parts = []
    for L in sorted(set(df["context_length"])):
        t = score_table(df, L)
        cols = task_columns(t)
        lines = [f"### {Path(path).stem}, {L} tokens",
                 "| method | × fewer bytes than 16-bit | " + " | ".join(cols) + " | Δ dense [95% CI] | gold NLL/token | n |",
                 "|---|---:|" + "---:|" * len(cols) + "---:|---:|---:|"]
        lines += [f"| {lbl} | {r['ratio']:.2f} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
                  + f" | {r['delta']:+.1f} {_ci(r['delta_lo'], r['delta_hi'])} | {r.get('gold_nll', np.nan):.3f}"
                  + f" | {int(r['n'])} |" for lbl, r in t.iterrows()]
        calibrated = t[t["calibration_mib"] > 0] if "calibration_mib" in t else t.iloc[:0]
        if len(calibrated):
            lines += ["", "Calibrated rows: × counts the calibration once per model, as every sequence shares it; "
                      "held by one sequence alone: " + "; ".join(
                          f"{lbl} {r['calibration_mib']:.1f} MiB of calibration, {r['ratio_all_in']:.2f}× all in"
                          for lbl, r in calibrated.iterrows())]
        if len(left_out := unfinished(df, L)):
            lines += ["", "Left out, so that every row is on the same samples: methods short of samples (pairs of "
                      f"task and sample finished, of {pairs_done(df, L).max()}; an earlier variant no grid runs any "
                      "more, or a method still running): " + "; ".join(f"{lbl} ({n})" for lbl, n in left_out.items())]
        h = headline(t)
        lines += ["", f"Headline at matched 16-bit ratios (at most {MATCH:.0%} more bytes, {2 * MATCH:.0%} fewer), {L} "
                  "tokens; dense "
                  f"{t.at['dense', 'average']:.1f}:", "",
                  "| ≈ ratio | family | best method | × | score | Δ dense [95% CI] |", "|---:|---|---|---:|---:|---:|"]
        lines += [f"| {r['target']:g}× | {r['family']} | {r['method']} | {r['ratio']:.2f} | {r['average']:.1f} | "
                  f"{r['delta']:+.1f} {_ci(r['delta_lo'], r['delta_hi'])} |" for _, r in h.iterrows()]
        for ratio in (4, 8):
            g = goal_checks(df, L, ratio, t)
            lines.append(f"\n≈{ratio}×: dense {g['dense']:.1f}; best kvsvd {_best(g, 'kvsvd')}; best press "
                         f"{_best(g, 'press')}; best quantisation peer {_best(g, 'quantized')}; within 2 of dense: "
                         f"{g.get('within_2_of_dense')}; ahead of every press: {g.get('ahead_of_every_press')}; "
                         f"ahead of every quantisation peer: {g.get('ahead_of_every_quantized')}; a peer with no more "
                         f"bytes scoring higher: {g.get('dominated_by')}"
                         + (f"; best transform coding {_best(g, 'transform')}: within 2 of dense "
                            f"{g['transform_within_2_of_dense']}, ahead of every press "
                            f"{g.get('transform_ahead_of_every_press')}, ahead of every quantisation peer "
                            f"{g.get('transform_ahead_of_every_quantized')}, a peer with no more bytes scoring "
                            f"higher: {g['transform_dominated_by']}" if "best_transform" in g else "")
                         + "".join(f"; {e['config']}: {e['rsvd_q2']:.1f} vs full_svd {e['full_svd']:.1f} "
                                   f"(paired Δ {e['delta']:+.1f}, 95% CI {_ci(*e['delta_ci'])})"
                                   for e in g.get("n_iter2_vs_exact", [])))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
