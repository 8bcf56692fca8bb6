"""A grid's results: one JSON line per finished cell, resumed, sharded over torchrun processes, and sealed.

Each finished cell is appended (and flushed) as one JSON line, so a rerun skips finished
cells and an interrupted run loses at most the cell in flight; a corrupt last line (a
process killed mid-write) is dropped and redone. A grid may grow in place (more methods,
tasks, lengths or samples: only new cells run); a file from another model or seed, or with a
task decoded under another ``max_new_tokens``, is refused. Under ``torchrun`` the samples are
sharded over the processes and rank 0 merges the shards into ``out``.

A long grid keeps its tracked file small by sealing finished context lengths (``seal`` or
``python -m kvsvd seal CONFIG.yaml LENGTH``): their rows move into a read-only gzip part
``NAME.<LENGTH>.jsonl.gz`` beside ``NAME.jsonl``, which resuming and ``load_results`` read with it.

Every row holds ``kv_bytes_held`` (each tensor the cache holds, counted by ``kvsvd.accounting``),
``kv_bytes_dense16``, ``kv_ratio`` = dense16 / held, and ``paths``: how many K/V matrices each path
holds (``randomized q2 p8 bf16``, ``gram bf16``, ``dense bf16``, ``tova eviction, dense bf16``, ...); a
row with a ratio but no paths is refused.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

from .gridspec import Grid, cell_key, cells, entry, label, load_grid, runs_svd


def read_rows(path: Path, config_hash: str | None = None) -> list[dict]:
    """Rows of a results file (``.jsonl``, or a sealed ``.jsonl.gz`` part); a corrupt last line of a live
    file is truncated away (it is redone), a corrupt line anywhere else raises."""
    if not path.exists():
        return []
    sealed = path.suffix == ".gz"
    lines = (gzip.decompress(path.read_bytes()) if sealed else path.read_bytes()).split(b"\n")
    rows, good_bytes = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if sealed or any(x.strip() for x in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is corrupt and is not the last line of a live file") from None
            with open(path, "r+b") as f:  # killed mid-write: drop the partial line
                f.truncate(good_bytes)
            break
        good_bytes += len(line) + 1
    if config_hash is not None:
        other = {r.get("config_hash") for r in rows} - {config_hash}
        if other:
            raise ValueError(f"{path} was written by another grid config (config_hash {sorted(other)} != "
                             f"{config_hash}): choose another 'out' or remove the file")
    return rows


def sealed_parts(out: Path) -> list[Path]:
    """The sealed parts of results file ``out``: ``NAME.<context_length>.jsonl.gz`` beside ``NAME.jsonl``."""
    return sorted(out.parent.glob(f"{out.stem}.*.jsonl.gz"))


def rows_by_key(paths: list[Path], config_hash: str | None = None) -> dict[str, dict]:
    """The rows of ``paths`` by cell key, a later file's row winning over an earlier one's."""
    return {r["key"]: r for path in paths for r in read_rows(path, config_hash)}


def read_results(out: Path, config_hash: str | None = None) -> dict[str, dict]:
    """Every row of results file ``out`` and its sealed parts, by cell key (the live file's row wins)."""
    return rows_by_key([*sealed_parts(out), out], config_hash)


def check_budgets(grid: Grid, rows) -> None:
    """Rows of the grid's tasks must have been decoded with the task's ``max_new_tokens``."""
    for r in rows:
        want = grid.max_new_tokens.get(r["task"])
        if want is not None and r.get("max_new_tokens") != want:
            raise ValueError(f"max_new_tokens[{r['task']}]={want} but {grid.out} holds cells of that task decoded "
                             f"with {r.get('max_new_tokens')}: choose another 'out' or remove the file")


def validate_row(row: dict) -> None:
    """The row schema's byte and path fields: a row with a ratio must name the paths that ran."""
    if "kv_ratio" in row and not row.get("paths"):
        raise ValueError(f"row {row.get('key')} has kv_ratio but no paths: every row must name the paths that ran")


def shard_path(grid: Grid, rank: int) -> Path:
    return grid.out.with_suffix(f".rank{rank}.jsonl")


def shards(grid: Grid) -> list[Path]:
    """Shard files next to ``out``: this run's, or those an interrupted run with another process count left."""
    return sorted(grid.out.parent.glob(shard_path(grid, 0).name.replace(".rank0.", ".rank*.")))


def merge_shards(grid: Grid) -> None:
    """Rank 0: fold every shard into ``out``."""
    left = shards(grid)
    _write_rows(grid, rows_by_key([grid.out, *left], grid.config_hash), grid.out)
    for path in left:
        path.unlink(missing_ok=True)


def _write_rows(grid: Grid, rows: dict[str, dict], path: Path) -> None:
    """Replace ``path`` (gzip for ``.gz``) by ``rows`` in the grid's canonical cell order; rows of cells the
    grid no longer names are kept, after them."""
    order = [cell_key(m, *u) for u, m in cells(grid)]
    named = set(order)
    _replace(path, "".join(json.dumps(rows[k]) + "\n" for k in order + [k for k in rows if k not in named] if k in rows))


def _replace(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` (gzip for ``.gz``, deterministic) through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(data.encode(), mtime=0) if path.suffix == ".gz" else data.encode())
    tmp.replace(path)


def seal(source: str | Path | dict, context_length: int) -> Path:
    """Move every row of a finished ``context_length`` out of the grid's live file into the sealed part
    ``NAME.<context_length>.jsonl.gz`` (merged with the part's rows if it exists); returns its path.
    Refuses a length with unfinished cells or torchrun shards not yet merged."""
    grid = load_grid(source)
    if context_length not in grid.context_lengths:
        raise ValueError(f"context_length={context_length} is out of range; accepted: one of the grid's "
                         f"context_lengths {grid.context_lengths}")
    if left := shards(grid):
        raise ValueError(f"{grid.out}: torchrun shards {[p.name for p in left]} are not merged; "
                         "resume the grid (one process merges them) before sealing")
    part = grid.out.with_name(f"{grid.out.stem}.{context_length}.jsonl.gz")
    live = read_rows(grid.out, grid.config_hash)
    rows = rows_by_key([part], grid.config_hash)
    rows.update({r["key"]: r for r in live if r["context_length"] == context_length})
    keys = (cell_key(m, *u) for u, m in cells(grid) if u[1] == context_length)
    missing = [k for k in keys if k not in rows]
    if missing:
        raise ValueError(f"context_length={context_length} has {len(missing)} unfinished cells (first: "
                         f"{missing[0]}): seal a length only once the grid has finished it")
    _write_rows(grid, rows, part)  # the part first: a kill between the two writes leaves duplicates, not a loss
    _write_rows(grid, {r["key"]: r for r in live if r["context_length"] != context_length}, grid.out)
    return part


def rekey_methods(path: Path, change: Callable[[dict], dict | None]) -> int:
    """Rewrite the method of every row of results file ``path`` (live, or a sealed ``.gz`` part) as
    ``change(method)`` (None: unchanged) and key the row anew. Returns how many rows changed; a row whose new
    key another row already has is refused."""
    rows = read_rows(path)
    keys = {r["key"] for r in rows}
    changed = 0
    for r in rows:
        if (method := change(r["method"])) is not None:
            r["method"] = method
            r["key"] = cell_key(method, r["task"], r["context_length"], r["index"])
            if r["key"] in keys:
                raise ValueError(f"{path}: a rewritten row's key is another row's: {r['key']}")
            keys.add(r["key"])
            changed += 1
    _replace(path, "".join(json.dumps(r) + "\n" for r in rows))
    return changed


def pin_method_field(path: Path, method: str, name: str, value, where=lambda method: True) -> int:
    """Name ``name: value`` in the method of every row of ``path`` whose method is ``method``, does not name
    ``name`` and passes ``where`` (a predicate on the method dict) (:func:`rekey_methods`): when a method's
    default changes, its earlier rows keep saying what ran and are labelled as that variant, apart from the
    new default's cells."""
    return rekey_methods(path, lambda m: {**m, name: value} if m["method"] == method and name not in m and where(m)
                         else None)


def fold_into_default(path: Path, method: str, fields: dict, where=lambda method: True) -> int:
    """Drop ``fields`` from the method of every row of ``path`` whose method is ``method``, names exactly
    those values and passes ``where`` (:func:`rekey_methods`): when a variant becomes the default, its rows
    are the default's cells (each row's recorded config says what ran)."""
    return rekey_methods(path, lambda m: {k: v for k, v in m.items() if k not in fields}
                         if m["method"] == method and all(m.get(k) == v for k, v in fields.items()) and where(m)
                         else None)


def earlier_variant(method: dict) -> bool:
    """Whether a row's recorded method is an earlier variant: one that records keys no grid runs any more
    (``rope_tables``, ``fp32_ratio``), which :func:`~kvsvd.gridspec.entry` refuses."""
    try:
        entry(method)
    except ValueError:
        return True
    return False


def load_results(path: str | Path):
    """A tidy pandas DataFrame: one row per cell of results file ``path`` and its sealed parts, the
    method's fields as ``m_*`` columns, ``svd_ran`` (the SVD paths its K/V matrices ran, over all rows
    of the method at that context length) and ``label`` (what was asked and, for rsvd, what ran: ``... rsvd q2 → gram``)."""
    import pandas as pd
    rows = read_results(Path(path)).values()
    records = []
    for r in rows:
        validate_row(r)
        rec = {k: v for k, v in r.items() if k not in ("method", "config", "compression_breakdown_ms", "paths",
                                                   "kv_bytes_by_kind")}
        rec.update({f"m_{k}": v for k, v in r["method"].items()})
        rec.update({f"stage_{k}": v for k, v in r.get("compression_breakdown_ms", {}).items()})
        rec.update({f"bytes_{k}": v for k, v in r.get("kv_bytes_by_kind", {}).items()})
        rec["paths"] = ", ".join(f"{p} ×{n}" for p, n in sorted(r.get("paths", {}).items()))
        rec["svd_kinds"] = "+".join(sorted({p.split()[0] for p in r.get("paths", {})} - {"dense"})) or None
        rec["label"] = label(r["method"], r.get("config"))
        rec["earlier_variant"] = earlier_variant(r["method"])
        rec["asked_rsvd"] = runs_svd(r["method"]) and r["method"].get("svd", "rsvd") == "rsvd"
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if not df.empty:
        kinds = df.groupby(["label", "context_length"])["svd_kinds"].agg(
            lambda s: "+".join(sorted({k for v in s.dropna() for k in v.split("+")})))
        df["svd_ran"] = [kinds[key] or None for key in zip(df["label"], df["context_length"])]
        asked_rsvd = df.pop("asked_rsvd")
        df.loc[asked_rsvd, "label"] = df["label"] + " → " + df["svd_ran"].fillna("dense")
    return df


