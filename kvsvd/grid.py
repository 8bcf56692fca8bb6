"""Running a grid (``kvsvd.gridspec``): every cell a method × task × context length × sample, its row written
as it finishes (``kvsvd.results``).

For each sample the dense prefill runs once and every cell is filled from its record
(``evaluate.replay_prefill``: the same cache updates and press hooks, without the forward);
only a method that reads eager attention weights (ObservedAttention, too large to record) runs a
prefill of its own, one per sample for all its ratios (``evaluate.fan_out_prefill``).

With ``memoize_reads: true`` a kvsvd cache rebuilds its compressed segments once instead of at
every decode step (``LowRankCache(memoize_reads=True)``: the same tensors, so the same answers and
log-likelihoods; a test checks they are equal). It is for accuracy grids, where rebuilding the
unchanging prefix per token dominates the run: such rows hold ``reads_memoized``, the dense copies as
``kv_bytes_rebuilt`` (``kv_bytes_held`` stays the compressed state), and their decode time as
``decode_ms_per_token_memoized`` — it is not the method's decode latency (``bench cache`` measures that).

A long grid runs as a series of pieces: ``python -m kvsvd eval CONFIG --minutes N`` stops at the first
cell boundary after N minutes (every finished row written) and prints the cells done and left with an
estimate of the time left; ``--dry-run`` prints what is left, by length and method, and its estimated
time, without loading the model. Estimates come from the measured time of finished cells (``cell_s``:
a cell's wall time, its shared prefill apart) of the same method and length.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import accounting, ruler
from .cache import LowRankCache
from .calibrate import ensure as ensure_calibration
from .evaluate import Filled, Prefill, answer, fan_out_prefill, record_prefill, split_prompt
from .gridspec import cell_key, cells, entry, label, load_grid, method_json, units
from .results import check_budgets, merge_shards, rows_by_key, sealed_parts, shard_path, shards, validate_row

TIMING_KEYS = {"prefill_ms", "replay_ms", "compress_ms", "decode_ms_per_token", "decode_ms_per_token_memoized",
               "compression_breakdown_ms", "peak_rss_mb", "peak_cuda_mb", "cell_s"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


class PeersMissing(ModuleNotFoundError):
    """A grid names peer methods whose packages (kvsvd's ``peers`` extra) are not installed."""


def require_peers(methods: list[dict]) -> None:
    """Refuse, before a model loads, methods whose peer package is not installed, naming the extra."""
    missing = sorted({p for p in (entry(m).package for m in methods) if p and not _installed(p)})
    if missing:
        import transformers
        names = [label(m) for m in methods if entry(m).package in missing]
        raise PeersMissing(
            f"methods {names} need {', '.join(missing)}, from kvsvd's 'peers' extra: pip install -e '.[peers]' "
            f"(make setup installs it in .venv). kvpress 0.5.5 needs transformers>=4.56,<5.3 (installed: "
            f"{transformers.__version__}); run these grids in the workbook environment, or leave these methods out")


def build(method: dict, model, context_tokens: int, memoize_reads: bool = False, reserve_tokens: int = 0):
    """(cache, press) for one method at a context of ``context_tokens`` tokens (``memoize_reads``:
    see ``LowRankCache``); a ratio budgets ``reserve_tokens`` more tokens held dense after the context
    (the question and the decode budget of a ``budget: timeline`` grid)."""
    return entry(method).build(model, context_tokens, reserve_tokens=reserve_tokens, memoize_reads=memoize_reads)


def paths(cache, method: dict, model_config) -> dict[str, int]:
    """How many K or V matrices each path holds: ``LowRankCache.path_counts``, else one path for all
    2·L matrices of a peer (``dense fp32``, ``dense bf16``, ``tova eviction, dense bf16``, ``quanto int4``)."""
    if isinstance(cache, LowRankCache):
        return cache.path_counts()
    return {entry(method).path(cache, model_config): 2 * accounting.ModelShape.of(model_config).layers}


def shares_prefill(method: dict) -> bool:
    """Whether a cell can be filled from the sample's recorded dense (SDPA) prefill."""
    return not entry(method).eager


@contextlib.contextmanager
def attention_for(model, method: dict):
    """The attention the method's prefill and decode run with: eager for a method that reads the
    attention weights (ObservedAttention), the model's own otherwise."""
    previous = model.config._attn_implementation
    eager = entry(method).eager
    if eager:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if eager:
            model.set_attn_implementation(previous)


def fan_out(model, methods: list[dict], ctx: torch.Tensor, memoize_reads: bool = False,
            reserve_tokens: int = 0) -> list[Filled]:
    """Caches of ``methods`` (one press, several ratios) filled from one prefill forward of ``ctx``."""
    with attention_for(model, methods[0]):
        return fan_out_prefill(model, ctx, [build(m, model, ctx.shape[1], memoize_reads, reserve_tokens)
                                            for m in methods])


def run_cell(model, tok, sample: dict, method: dict, task: str, max_new_tokens: int,
             prefill: Prefill | Filled | None = None, prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
             memoize_reads: bool = False, reserve_tokens: int = 0) -> dict:
    """One cell; with ``prefill`` (``record_prefill`` of this sample's context) the cache is
    filled from the record instead of a forward of its own, with a :class:`Filled` (``fan_out``)
    its cache is that one; ``prompt`` is ``split_prompt``'s result when the caller has it already;
    ``memoize_reads`` as the grid key; ``reserve_tokens`` as in :func:`build`."""
    if isinstance(prefill, Prefill) and not shares_prefill(method):
        raise ValueError(f"method {method} cannot be filled from a recorded prefill (it needs its own forward)")
    prompt = prompt if prompt is not None else split_prompt(tok, sample)
    n_ctx = prompt[0].shape[1]
    made = lambda: build(method, model, n_ctx, memoize_reads, reserve_tokens)  # noqa: E731
    cache, press = (prefill.cache, None) if isinstance(prefill, Filled) else made()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gold = " " + " ".join(sample["outputs"])
    with attention_for(model, method):
        res = answer(model, tok, sample, cache, max_new_tokens=max_new_tokens, press=press, gold=gold,
                     new_cache=lambda: made()[0], prompt=prompt, prefill=prefill)
    held = accounting.cache_report(cache, model.config, res["processed_tokens"])
    stages: dict[str, float] = {}
    for logged in res.pop("compression_log", []):
        for stage, ms in logged["breakdown_ms"].items():
            stages[stage] = stages.get(stage, 0.0) + ms
    row = {**res, "compression_breakdown_ms": stages, "kv_bytes_dense16": held["dense16_bytes"],
           "kv_bytes_held": held["total_bytes"], "kv_ratio": held["ratio"], "kv_ratio_all_in": held["ratio_all_in"],
           "paths": paths(cache, method, model.config),
           "kv_bytes_by_kind": {k.removesuffix("_bytes"): v for k, v in held.items()
                                if k.removesuffix("_bytes") in accounting.KINDS and v},
           "score": ruler.score(task, [res["prediction"]], [sample["outputs"]]),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if model.device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if held["rebuilt_bytes"]:  # dense read copies kept between steps (memoized reads, TurboQuant's view)
        row["kv_bytes_rebuilt"] = held["rebuilt_bytes"]
    if isinstance(cache, LowRankCache):  # the config the cell ran, its defaults resolved for this model and context
        row["config"] = cache.config.to_dict()
        if row["config"].get("calibration_path"):  # its file name: the folder is this machine's model cache
            row["config"]["calibration_path"] = Path(row["config"]["calibration_path"]).name
        row["rank_k"], row["rank_v"] = row["config"].get("rank_k"), row["config"].get("rank_v")
        if memoize_reads:
            row.update(reads_memoized=True, decode_ms_per_token_memoized=row.pop("decode_ms_per_token"))
    return row


def cell_seconds(row: dict) -> float:
    """A finished cell's wall time without its shared prefill: ``cell_s``, or for rows written before it
    was measured, the sum of its timed parts (own prefill or replay, compression, decode)."""
    if "cell_s" in row:
        return row["cell_s"]
    decode = row.get("decode_ms_per_token", row.get("decode_ms_per_token_memoized")) or 0.0
    own = row.get("replay_ms") if row.get("prefill_shared") else row.get("prefill_ms")
    return ((own or 0.0) + (row.get("compress_ms") or 0.0) + decode * row.get("new_tokens", 0)) / 1000


def estimate_seconds(todo: list[tuple[tuple[str, int, int], dict]], done: dict[str, dict]) -> dict[str, float | None]:
    """Estimated seconds of each cell of ``todo`` (by cell key), from finished rows: the median of the same
    method at the same length, else at another length scaled by the length ratio, else of every method at
    that length; a sample's shared prefill (the median ``prefill_ms``, scaled likewise) is added to its
    first cell that shares it. None where nothing was measured."""
    by_method: dict[tuple[str, int], list[float]] = {}
    by_length: dict[int, list[float]] = {}
    prefill: dict[int, list[float]] = {}
    for r in done.values():
        if "context_length" not in r or "method" not in r:
            continue
        seconds = cell_seconds(r)
        by_method.setdefault((method_json(r["method"]), r["context_length"]), []).append(seconds)
        by_length.setdefault(r["context_length"], []).append(seconds)
        if r.get("prefill_shared") and r.get("prefill_ms"):
            prefill.setdefault(r["context_length"], []).append(r["prefill_ms"] / 1000)

    def scaled(measured: dict, L: int) -> float | None:
        """The median at length L, else the medians at other lengths scaled by the length ratio."""
        if L in measured:
            return statistics.median(measured[L])
        return statistics.median([(L / L0) * statistics.median(v) for L0, v in measured.items()]) if measured else None

    def one(method: dict, L: int) -> float | None:
        mine = {L0: v for (m, L0), v in by_method.items() if m == method_json(method)}
        return scaled(mine, L) if mine else (statistics.median(by_length[L]) if L in by_length else None)

    out: dict[str, float | None] = {}
    recorded: set[tuple[str, int, int]] = set()
    for u, m in todo:
        seconds = one(m, u.context_length)
        if seconds is not None and shares_prefill(m) and u not in recorded:
            recorded.add(u)
            seconds += scaled(prefill, u.context_length) or 0.0
        out[cell_key(m, *u)] = seconds
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no finished cell to estimate from)"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min" if minutes else f"{seconds:.0f} s"


def _total(estimates) -> float | None:
    values = list(estimates)
    return None if any(v is None for v in values) else sum(values)


def plan(source: str | Path | dict) -> str:
    """What a run of the grid would do now, without loading a model: the cells left by length and method
    and their estimated time (from the finished cells' measured times), then the totals."""
    grid = load_grid(source)
    done = rows_by_key([*sealed_parts(grid.out), grid.out, *shards(grid)], grid.config_hash)
    named = cells(grid)
    todo = [(u, m) for u, m in named if cell_key(m, *u) not in done]
    est = estimate_seconds(todo, done)
    untimed = sum("cell_s" not in r for r in done.values())
    lines = [f"{grid.name}: {len(named) - len(todo)} of {len(named)} cells done, {len(todo)} left, "
             f"estimated {format_duration(_total(est.values()))} from the finished cells' times"
             + (f" ({untimed} rows predate cell_s: their timed parts leave out the question's prefill and the "
                "gold answer's scoring, so estimates from them run short)" if untimed and todo else ""), "",
             "| context length | method | cells left | estimated |", "|---:|---|---:|---:|"]
    for L in sorted(grid.context_lengths):
        for m in grid.methods_at(L):
            keys = [cell_key(m, *u) for u, m2 in todo if u.context_length == L and m2 is m]
            if keys:
                lines.append(f"| {L} | {label(m)} | {len(keys)} | "
                             f"{format_duration(_total(est[k] for k in keys))} |")
    return "\n".join(lines)


def run(source: str | Path | dict, model=None, tokenizer=None, minutes: float | None = None) -> Path:
    """Run (or resume) a grid; returns the results path. Shards over torchrun processes. With ``minutes``
    it stops at the first cell boundary after that many minutes (at least one cell runs), every finished
    row written, and prints the cells done and left and the estimated time left."""
    if minutes is not None and not minutes >= 0:
        raise ValueError(f"minutes={minutes} is out of range; accepted: >= 0")
    started = time.monotonic()
    grid = load_grid(source)
    require_peers(grid.methods)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if model is None:
        from .models import load_model
        model, tokenizer = load_model(grid.model, device="cuda" if torch.cuda.is_available() else "cpu")
    grid.out.parent.mkdir(parents=True, exist_ok=True)
    if world == 1 and shards(grid):  # left by an interrupted torchrun run: fold them in first
        merge_shards(grid)
    shard = grid.out if world == 1 else shard_path(grid, rank)
    done = rows_by_key([*sealed_parts(grid.out), grid.out, *shards(grid)], grid.config_hash)
    check_budgets(grid, done.values())
    todo = [(u, m) for u, m in cells(grid, units(grid)[rank::world]) if cell_key(m, *u) not in done]
    for calibration in {entry(m).calibration for _, m in todo} - {None}:  # once per model and grouping
        ensure_calibration(model, tokenizer, *calibration)
    samples: dict[tuple[str, int], list[dict]] = {}
    sample_state = SampleState()
    finished = 0
    with open(shard, "a") as f:
        for (task, L, i), method in tqdm(todo, desc=f"{grid.name} (rank {rank}/{world})"):
            if minutes is not None and finished and time.monotonic() - started >= 60 * minutes:
                break
            if (task, L) not in samples:
                samples[task, L] = ruler.generate(task, grid.n_samples, L, tokenizer, seed=grid.seed)
            sample = samples[task, L][i]
            key = cell_key(method, task, L, i)
            if sample_state.unit != (task, L, i):  # a new sample: drop the previous one's record
                sample_state = SampleState()
                gc.collect()  # the last sample's caches and presses sit in reference cycles: RSS grew per sample
                prompt = split_prompt(tokenizer, sample)
                reserve = prompt[1].shape[1] + grid.max_new_tokens[task] if grid.budget == "timeline" else 0
                sample_state = SampleState((task, L, i), prompt, reserve)
            if shares_prefill(method) and sample_state.record is None:
                sample_state.record = record_prefill(model, sample_state.prompt[0].to(model.device))
            t0 = time.perf_counter()
            if not shares_prefill(method) and key not in sample_state.filled:  # these cells: one forward
                group = [m for u, m in todo if u == (task, L, i) and not shares_prefill(m)]
                sample_state.filled.update(zip(
                    (cell_key(m, task, L, i) for m in group),
                    fan_out(model, group, sample_state.prompt[0], grid.memoize_reads, sample_state.reserve)))
            row = run_cell(model, tokenizer, sample, method, task, grid.max_new_tokens[task],
                           sample_state.record if shares_prefill(method) else sample_state.filled.pop(key),
                           prompt=sample_state.prompt, memoize_reads=grid.memoize_reads,
                           reserve_tokens=sample_state.reserve)
            dense = done.get(cell_key({"method": "none"}, task, L, i))
            row["agreement_with_dense"] = None if dense is None else float(
                row["prediction"].strip() == dense["prediction"].strip())
            row.update(key=key, config_hash=grid.config_hash, grid=grid.name,
                       method=method, task=task, context_length=L, index=i, outputs=sample["outputs"],
                       max_new_tokens=grid.max_new_tokens[task], cell_s=time.perf_counter() - t0)
            validate_row(row)
            done[row["key"]] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            finished += 1
    left = todo[finished:]
    print(f"{grid.name} (rank {rank}/{world}): {finished} cells done in this run, {len(left)} left"
          + (f", estimated {format_duration(_total(estimate_seconds(left, done).values()))}" if left else "")
          + (f"; stopped after {minutes:g} minutes, the same command resumes" if left else ""), flush=True)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0 and shards(grid):
        merge_shards(grid)
    if world > 1:
        torch.distributed.barrier()
    return grid.out


@dataclass
class SampleState:
    """The sample whose cells are running: its prompt (context ids, question ids), the tokens a timeline
    budget reserves, the recorded dense prefill its cells share, and the caches of cells that cannot
    share it (one forward per press, ``fan_out``), by cell key."""
    unit: tuple = ()
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None
    reserve: int = 0
    record: Prefill | None = None
    filled: dict[str, Filled] = field(default_factory=dict)


