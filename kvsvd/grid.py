"""The evaluation grid: method × ranks × layer_group_size × n_iter × task × context length × sample.

A grid is a YAML file (or dict)::

    name: cpu_smoke
    model: smollm2-135m
    tasks: [niah_single_1]
    context_lengths: [1024]
    n_samples: 2
    seed: 0
    max_new_tokens: 24        # or per task: {niah_single_1: 24, niah_multivalue: 64}
    memoize_reads: false      # true: kvsvd caches rebuild their compressed prefix once, not per step
    out: results/eval/cpu_smoke.jsonl
    methods:
      - {method: xkv, layer_group_size: [2, 5], ratio: [4, 8], key_space: pre_rope}
      - {method: press, press: [knorm, snapkv], ratio: [4, 8]}

A list value in a method entry expands into one method per value (a product over lists). An entry's
``context_lengths`` (a subset of the grid's) runs its methods at those lengths only, so that a grid can be
complete at one length and focused at another; it is not part of the method (nor of its cells' keys).
``ratio`` asks for that many times fewer KV bytes than a 16-bit dense cache (``kvsvd.accounting``),
whatever dtype the model computes in: kvsvd methods get ranks from ``ranks_for_ratio`` (counting
residual, RoPE and scale bytes and the ``factor_dtype`` width), presses prune a bf16-stored cache
(``Dense16Cache``) with compression_ratio = 1 − 1/ratio; ``method: quantized`` is transformers'
QuantizedCache (``nbits``, ``backend``: quanto or hqq), which keeps its residual window in the model
dtype; ``method: dense16`` is the 16-bit dense cache itself. The dense reference (``method: none``,
``DynamicCache`` in the model dtype) always runs first for every sample.

Every row holds ``kv_bytes_held`` (each tensor the cache holds, counted by ``kvsvd.accounting``),
``kv_bytes_dense16``, ``kv_ratio`` = dense16 / held, and ``paths``: how many K/V matrices each path
holds (``randomized q2 p8 bf16``, ``gram bf16``, ``dense bf16``, ``tova eviction, dense bf16``, ...); a
row with a ratio but no paths is refused.

For each sample the dense prefill runs once and every cell is filled from its record
(``evaluate.replay_prefill``: the same cache updates and press hooks, without the forward);
only ObservedAttention, which reads eager attention weights (too large to record), runs a prefill of
its own, one per sample for all its ratios (``evaluate.fan_out_prefill``).

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

Each finished cell is appended (and flushed) as one JSON line, so a rerun skips finished
cells and an interrupted run loses at most the cell in flight; a corrupt last line (a
process killed mid-write) is dropped and redone. A grid may grow in place (more methods,
tasks, lengths or samples: only new cells run); a file from another model or seed, or with a
task decoded under another ``max_new_tokens``, is refused. Under ``torchrun`` the samples are
sharded over the processes (gloo on CPU, nccl on GPU) and rank 0 merges the shards into ``out``.

A long grid keeps its tracked file small by sealing finished context lengths (``seal`` or
``python -m kvsvd seal CONFIG.yaml LENGTH``): their rows move into a read-only gzip part
``NAME.<LENGTH>.jsonl.gz`` beside ``NAME.jsonl``, which resuming and ``load_results`` read with it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from . import accounting, ruler
from .cache import LowRankCache
from .calibrate import default_path as calibration_path, ensure as ensure_calibration
from .config import DEFAULT_GROUP_SIZE, METHODS as KVSVD_METHODS, CompressionConfig, config_for_ratio, transform_window
from .methods.transform import TransformConfig
from .dense import Dense16Cache
from .evaluate import Filled, Prefill, answer, fan_out_prefill, record_prefill, split_prompt

PRESSES = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress", "knorm": "KnormPress",
           "expected_attention": "ExpectedAttentionPress", "pyramidkv": "PyramidKVPress", "tova": "TOVAPress",
           "observed_attention": "ObservedAttentionPress"}
METHODS = ("none", "dense16", "press", "quantized", "turboquant", *KVSVD_METHODS)
SVD_FACTORISED = ("svd", "xkv", "transform")  # the methods that call an SVD function
# a method's transform settings (ratio is the method's own; reserve_tokens comes from the grid's budget)
TRANSFORM_FIELDS = tuple(f for f in TransformConfig.__dataclass_fields__ if f not in ("ratio", "reserve_tokens"))
GRID_KEYS = {"name", "model", "tasks", "context_lengths", "n_samples", "seed", "max_new_tokens", "methods", "out",
             "memoize_reads", "budget"}
BUDGETS = ("context", "timeline")
# the keys each method takes: a peer its own, a kvsvd method CompressionConfig's fields (transform its own too)
PEER_KEYS = {"none": {"method"}, "dense16": {"method"}, "press": {"method", "press", "ratio"},
             "quantized": {"method", "backend", "nbits", "residual_length"}, "turboquant": {"method", "nbits"}}
KVSVD_KEYS = {"method", "ratio", "k_share"} | set(CompressionConfig.__dataclass_fields__) - {"method", "transform"}
METHOD_KEYS = set().union(*PEER_KEYS.values(), KVSVD_KEYS, TRANSFORM_FIELDS)


def method_keys(method: str) -> set[str]:
    """The keys a grid method entry of kind ``method`` takes."""
    return PEER_KEYS.get(method) or KVSVD_KEYS | (set(TRANSFORM_FIELDS) if method == "transform" else set())
TIMING_KEYS = {"prefill_ms", "replay_ms", "compress_ms", "decode_ms_per_token", "decode_ms_per_token_memoized",
               "compression_breakdown_ms", "peak_rss_mb", "peak_cuda_mb", "cell_s"}


@dataclass
class Grid:
    name: str
    model: str
    tasks: list[str]
    context_lengths: list[int]
    n_samples: int
    methods: list[dict]
    out: Path
    seed: int = 0
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # task -> decode budget
    memoize_reads: bool = False  # kvsvd caches rebuild their compressed segments once (LowRankCache)
    # what a method's ratio budgets: the prefilled context ("context"), or the whole timeline a cell
    # holds at its end ("timeline": context, question and decode budget, the last two held dense)
    budget: str = "context"
    # method (its cell-key JSON) -> the only context lengths it runs at; a method absent runs at every length
    only_at: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def methods_at(self, context_length: int) -> list[dict]:
        """The grid's methods that run at ``context_length``, in the grid's order."""
        return [m for m in self.methods if context_length in self.only_at.get(method_json(m), (context_length,))]

    @property
    def config_hash(self) -> str:
        """Identity of what every cell shares: the model and the samples' seed. Cells are named by
        method, task, context length and sample (their key), so a grid may grow (more methods,
        tasks, lengths or samples) and keep its finished cells; a task's decode budget is checked
        per row (:func:`check_budgets`)."""
        body = {"model": self.model, "seed": self.seed, "bytes": "16-bit",
                **({"budget": self.budget} if self.budget != "context" else {})}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def method_json(method: dict) -> str:
    return json.dumps(method, sort_keys=True)


def expand_methods(entries: list[dict], context_lengths: list[int]) -> tuple[list[dict], dict[str, tuple[int, ...]]]:
    """One method dict per combination of list values (``none`` first, added if missing), and the lengths of
    the methods that run at only some of ``context_lengths`` (their entries' ``context_lengths``; a method
    named by several entries runs at the union of their lengths)."""
    out: list[dict] = []
    lengths_of: dict[str, set[int]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "method" not in entry:
            raise ValueError(f"methods[{i}] must be a mapping with a 'method' key, got {entry!r}")
        unknown = set(entry) - METHOD_KEYS - {"context_lengths"}
        if unknown:
            raise ValueError(f"methods[{i}] has unknown key(s) {sorted(unknown)}; accepted: "
                             f"{sorted(METHOD_KEYS | {'context_lengths'})}")
        entry = dict(entry)
        at = entry.pop("context_lengths", context_lengths)
        at = at if isinstance(at, list) else [at]
        if not at or not set(at) <= set(context_lengths):
            raise ValueError(f"methods[{i}].context_lengths={at} is out of range; accepted: a non-empty subset of "
                             f"the grid's context_lengths {context_lengths}")
        keys = list(entry)
        for combo in itertools.product(*(_as_list(entry[k]) for k in keys)):
            spec = dict(zip(keys, combo))
            if spec["method"] not in METHODS:
                raise ValueError(f"methods[{i}].method={spec['method']!r} is unknown; accepted: {', '.join(METHODS)}")
            foreign = set(spec) - method_keys(spec["method"])
            if foreign:
                raise ValueError(f"methods[{i}] has key(s) {sorted(foreign)} that method {spec['method']!r} does not "
                                 f"take; accepted: {sorted(method_keys(spec['method']))}")
            if spec["method"] == "press" and spec.get("press") not in PRESSES:
                raise ValueError(f"methods[{i}].press={spec.get('press')!r} is unknown; accepted: {', '.join(PRESSES)}")
            if spec["method"] not in ("none",) and "ratio" in spec and not spec["ratio"] > 1:
                raise ValueError(f"methods[{i}].ratio={spec['ratio']} is out of range; accepted: > 1")
            if method_json(spec) not in lengths_of:
                out.append(spec)
            lengths_of.setdefault(method_json(spec), set()).update(at)
    if {"method": "none"} not in out:
        out.insert(0, {"method": "none"})
    dense = method_json({"method": "none"})  # the reference runs for every sample
    only_at = {k: tuple(sorted(v)) for k, v in lengths_of.items() if v != set(context_lengths) and k != dense}
    return out, only_at


def load_grid(source: str | Path | dict) -> Grid:
    """Read and validate a grid (YAML path or dict); errors name the offending key."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        import yaml
        raw = yaml.safe_load(Path(source).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"a grid config must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise ValueError(f"unknown grid key(s) {sorted(unknown)}; accepted: {sorted(GRID_KEYS)}")
    missing = {"name", "model", "tasks", "context_lengths", "n_samples", "methods", "out"} - set(raw)
    if missing:
        raise ValueError(f"missing grid key(s) {sorted(missing)}")
    for task in _as_list(raw["tasks"]):
        if task not in ruler.TASKS:
            raise ValueError(f"tasks: {task!r} is unknown; accepted: {', '.join(ruler.TASKS)}")
    lengths = [int(x) for x in _as_list(raw["context_lengths"])]
    if any(x < 256 for x in lengths):
        raise ValueError(f"context_lengths={lengths} out of range; accepted: >= 256")
    if not isinstance(raw["n_samples"], int) or raw["n_samples"] < 1:
        raise ValueError(f"n_samples={raw['n_samples']!r} out of range; accepted: >= 1")
    budget = raw.get("max_new_tokens", 32)
    budget = budget if isinstance(budget, dict) else {task: budget for task in _as_list(raw["tasks"])}
    if set(budget) != set(_as_list(raw["tasks"])) or not all(isinstance(n, int) and n >= 1 for n in budget.values()):
        raise ValueError(f"max_new_tokens={raw.get('max_new_tokens')!r} is out of range; accepted: an integer >= 1, "
                         f"or one for each task of {_as_list(raw['tasks'])}")
    if raw.get("budget", "context") not in BUDGETS:
        raise ValueError(f"budget={raw['budget']!r} is unknown; accepted: {', '.join(BUDGETS)}")
    if not isinstance(raw.get("memoize_reads", False), bool):
        raise ValueError(f"memoize_reads={raw['memoize_reads']!r} is out of range; accepted: true or false")
    methods, only_at = expand_methods(_as_list(raw["methods"]), lengths)
    return Grid(name=str(raw["name"]), model=str(raw["model"]), tasks=_as_list(raw["tasks"]), context_lengths=lengths,
                n_samples=raw["n_samples"], methods=methods, out=Path(raw["out"]), seed=int(raw.get("seed", 0)),
                max_new_tokens=budget, memoize_reads=raw.get("memoize_reads", False),
                budget=raw.get("budget", "context"), only_at=only_at)


def cell_key(method: dict, task: str, context_length: int, index: int) -> str:
    return json.dumps({"method": method, "task": task, "context_length": context_length, "index": index},
                      sort_keys=True)


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


def _peer_module(method: dict) -> str | None:
    """The package a peer method runs in (all of them in kvsvd's ``peers`` extra), or None."""
    if method["method"] == "quantized":
        return {"quanto": "optimum.quanto", "hqq": "hqq"}.get(method.get("backend", "quanto"))
    return {"press": "kvpress", "turboquant": "turboquant"}.get(method["method"])


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


class PeersMissing(ModuleNotFoundError):
    """A grid names peer methods whose packages (kvsvd's ``peers`` extra) are not installed."""


def require_peers(methods: list[dict]) -> None:
    """Refuse, before a model loads, methods whose peer package is not installed, naming the extra."""
    missing = sorted({m for m in map(_peer_module, methods) if m and not _installed(m)})
    if missing:
        import transformers
        names = [_label({f"m_{k}": v for k, v in m.items()}) for m in methods if _peer_module(m) in missing]
        raise PeersMissing(
            f"methods {names} need {', '.join(missing)}, from kvsvd's 'peers' extra: pip install -e '.[peers]' "
            f"(make setup installs it in .venv). kvpress 0.5.5 needs transformers>=4.56,<5.3 (installed: "
            f"{transformers.__version__}); run these grids in the workbook environment, or leave these methods out")


def build(method: dict, model, context_tokens: int, memoize_reads: bool = False, reserve_tokens: int = 0):
    """(cache, press) for one method at a context of ``context_tokens`` tokens (``memoize_reads``:
    see ``LowRankCache``); a ratio budgets ``reserve_tokens`` more tokens held dense after the context
    (the question and the decode budget of a ``budget: timeline`` grid)."""
    kind = method["method"]
    if kind == "none":
        return DynamicCache(), None
    if kind == "dense16":
        return Dense16Cache(model.config), None
    if kind == "press":
        import kvpress
        ratio, T = method.get("ratio", 2.0), context_tokens
        kept = (T + reserve_tokens) / ratio - reserve_tokens  # context tokens the press may keep
        if kept < 1:  # kvpress keeps at least one token: the row's measured kv_ratio falls short of the ratio
            warnings.warn(f"ratio={ratio} is out of reach for a press: the {reserve_tokens} question and decode tokens "
                          f"alone hold more than 1/{ratio} of {T + reserve_tokens} tokens; it keeps 1 context token "
                          f"(the fewest kvpress keeps) and the row's kv_ratio says what it held", stacklevel=2)
            kept = 1
        return Dense16Cache(model.config), getattr(kvpress, PRESSES[method["press"]])(compression_ratio=1 - kept / T)
    if kind == "quantized":  # transformers' QuantizedCache (KIVI-style, optimum-quanto or HQQ backend)
        from transformers import QuantizedCache
        return QuantizedCache(backend=method.get("backend", "quanto"), config=model.config,
                              nbits=method.get("nbits", 4), residual_length=method.get("residual_length", 128)), None
    if kind == "turboquant":  # the turboquant package's TurboQuantCache (random rotation + Lloyd-Max codebook)
        from turboquant import TurboQuantCache
        return TurboQuantCache(bits=method.get("nbits", 3)), None
    fields = {k: v for k, v in method.items()
              if k in CompressionConfig.__dataclass_fields__ or (kind == "transform" and k in TRANSFORM_FIELDS)}
    G = fields.setdefault("layer_group_size", DEFAULT_GROUP_SIZE[kind])
    if calibrated(method):
        fields.setdefault("calibration_path", str(calibration_path(model.config, G, method.get("start_layer", 0))))
    if kind == "transform" and "ratio" not in method:
        raise ValueError(f"method {method} needs a ratio: the transform coder's budget against a 16-bit cache")
    if "ratio" in method and kind in ("svd", "xkv", "pca", "transform"):
        config = config_for_ratio(method["ratio"], context_tokens, model.config, reserve_tokens=reserve_tokens,
                                  k_share=method.get("k_share", 1 / 3), **fields)
    else:
        config = CompressionConfig(**{"start_layer": accounting.ModelShape.of(model.config).layers % G, **fields})
    return LowRankCache(config, model.config, memoize_reads=memoize_reads), None


def calibrated(method: dict) -> bool:
    """Whether a method codes on a basis calibrated once per model (``kvsvd calibrate``'s default file)."""
    return method["method"] == "transform" and method.get("basis") == "calibrated"


def paths(cache, method: dict, model_config) -> dict[str, int]:
    """How many K or V matrices each path holds: ``LowRankCache.path_counts``, else one path for all
    2·L matrices of a peer (``dense fp32``, ``dense bf16``, ``tova eviction, dense bf16``, ``quanto int4``)."""
    if isinstance(cache, LowRankCache):
        return cache.path_counts()
    kind = method["method"]
    dtype = accounting.dtype_name(next(layer.dtype for layer in cache.layers if layer.is_initialized))
    label = {"none": f"dense {dtype}", "dense16": "dense bf16",
             "press": f"{method.get('press')} eviction, dense bf16",
             "quantized": f"{method.get('backend', 'quanto')} int{method.get('nbits', 4)}",
             "turboquant": f"turboquant {method.get('nbits', 3)}-bit, uint8 indices"}[kind]
    return {label: 2 * accounting.ModelShape.of(model_config).layers}


def validate_row(row: dict) -> None:
    """The row schema's byte and path fields: a row with a ratio must name the paths that ran."""
    if "kv_ratio" in row and not row.get("paths"):
        raise ValueError(f"row {row.get('key')} has kv_ratio but no paths: every row must name the paths that ran")


def shares_prefill(method: dict) -> bool:
    """Whether a cell can be filled from the sample's recorded dense (SDPA) prefill."""
    return method.get("press") != "observed_attention"  # it needs the eager attention weights


@contextlib.contextmanager
def attention_for(model, method: dict):
    """The attention the method's prefill and decode run with: eager for ObservedAttention (it
    reads the attention weights), the model's own otherwise."""
    previous = model.config._attn_implementation
    eager = method.get("press") == "observed_attention"
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
    for entry in res.pop("compression_log", []):
        for stage, ms in entry["breakdown_ms"].items():
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
    if isinstance(cache, LowRankCache):
        row["rank_k"], row["rank_v"] = cache.config.rank_k, cache.config.rank_v
        if memoize_reads:
            row.update(reads_memoized=True, decode_ms_per_token_memoized=row.pop("decode_ms_per_token"))
    return row


def units(grid: Grid) -> list[tuple[str, int, int]]:
    """(task, context_length, sample index) in run order: every task at the shortest length first,
    so an interrupted grid has whole tables at the lengths it finished."""
    return [(t, L, i) for L in sorted(grid.context_lengths) for t in grid.tasks for i in range(grid.n_samples)]


def cells(grid: Grid, units_: list[tuple[str, int, int]] | None = None) -> list[tuple[tuple[str, int, int], dict]]:
    """(unit, method) of every cell the grid names, in run order (of ``units_``, by default every unit)."""
    return [(u, m) for u in (units(grid) if units_ is None else units_) for m in grid.methods_at(u[1])]


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
        seconds = one(m, u[1])
        if seconds is not None and shares_prefill(m) and u not in recorded:
            recorded.add(u)
            seconds += scaled(prefill, u[1]) or 0.0
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
    done = rows_by_key([*sealed_parts(grid.out), grid.out, *_shards(grid)], grid.config_hash)
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
            keys = [cell_key(m, *u) for u, m2 in todo if u[1] == L and m2 is m]
            if keys:
                lines.append(f"| {L} | {_label({f'm_{k}': v for k, v in m.items()})} | {len(keys)} | "
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
    if world == 1 and _shards(grid):  # left by an interrupted torchrun run: fold them in first
        _merge_shards(grid)
    shard = grid.out if world == 1 else _shard(grid, rank)
    done = rows_by_key([*sealed_parts(grid.out), grid.out, *_shards(grid)], grid.config_hash)
    check_budgets(grid, done.values())
    todo = [(u, m) for u, m in cells(grid, units(grid)[rank::world]) if cell_key(m, *u) not in done]
    for method in {method_json(m): m for _, m in todo if calibrated(m)}.values():  # once per model and grouping
        ensure_calibration(model, tokenizer, method.get("layer_group_size", DEFAULT_GROUP_SIZE["transform"]),
                         method.get("start_layer", 0))
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
            if not shares_prefill(method) and key not in sample_state.filled:  # this press's cells: one forward
                group = [m for u, m in todo if u == (task, L, i) and m.get("press") == method.get("press")]
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
    if rank == 0 and _shards(grid):
        _merge_shards(grid)
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


def _shard(grid: Grid, rank: int) -> Path:
    return grid.out.with_suffix(f".rank{rank}.jsonl")


def _shards(grid: Grid) -> list[Path]:
    """Shard files next to ``out``: this run's, or those an interrupted run with another process count left."""
    return sorted(grid.out.parent.glob(_shard(grid, 0).name.replace(".rank0.", ".rank*.")))


def _merge_shards(grid: Grid) -> None:
    """Rank 0: fold every shard into ``out``."""
    shards = _shards(grid)
    _write_rows(grid, rows_by_key([grid.out, *shards], grid.config_hash), grid.out)
    for path in shards:
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
    if shards := _shards(grid):
        raise ValueError(f"{grid.out}: torchrun shards {[p.name for p in shards]} are not merged; "
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


def pin_method_field(path: Path, method: str, name: str, value, where=lambda method: True) -> int:
    """Name ``name: value`` in the method of every row of results file ``path`` (live, or a sealed ``.gz``
    part) whose method is ``method``, does not name ``name`` and passes ``where`` (a predicate on the
    method dict), and key the row anew: when a method's default changes, its earlier rows keep saying what
    ran and are labelled as that variant, apart from the new default's cells. Returns how many rows
    changed; a row whose new key another row already has is refused."""
    rows = read_rows(path)
    keys = {r["key"] for r in rows}
    changed = 0
    for r in rows:
        if r["method"]["method"] == method and name not in r["method"] and where(r["method"]):
            r["method"] = {**r["method"], name: value}
            r["key"] = cell_key(r["method"], r["task"], r["context_length"], r["index"])
            if r["key"] in keys:
                raise ValueError(f"{path}: a row with {name}={value!r} already has key {r['key']}")
            changed += 1
    _replace(path, "".join(json.dumps(r) + "\n" for r in rows))
    return changed


def load_results(path: str | Path):
    """A tidy pandas DataFrame: one row per cell of results file ``path`` and its sealed parts, the
    method's fields as ``m_*`` columns, ``svd_ran`` (the SVD paths its K/V matrices ran, over all rows
    of the method at that context length) and ``label`` (what was asked and, for rsvd, what ran: ``... rsvd q2 → gram``)."""
    import pandas as pd
    rows = read_results(Path(path)).values()
    records = []
    for r in rows:
        validate_row(r)
        rec = {k: v for k, v in r.items() if k not in ("method", "compression_breakdown_ms", "paths", "kv_bytes_by_kind")}
        rec.update({f"m_{k}": v for k, v in r["method"].items()})
        rec.update({f"stage_{k}": v for k, v in r.get("compression_breakdown_ms", {}).items()})
        rec.update({f"bytes_{k}": v for k, v in r.get("kv_bytes_by_kind", {}).items()})
        rec["paths"] = ", ".join(f"{p} ×{n}" for p, n in sorted(r.get("paths", {}).items()))
        rec["svd_kinds"] = "+".join(sorted({p.split()[0] for p in r.get("paths", {})} - {"dense"})) or None
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if not df.empty:
        df["label"] = df.apply(_label, axis=1)
        kinds = df.groupby(["label", "context_length"])["svd_kinds"].agg(
            lambda s: "+".join(sorted({k for v in s.dropna() for k in v.split("+")})))
        df["svd_ran"] = [kinds[key] or None for key in zip(df["label"], df["context_length"])]
        asked_rsvd = df["m_method"].isin(SVD_FACTORISED) & (df["m_svd"].fillna("rsvd") == "rsvd" if "m_svd" in df else True)
        if "m_basis" in df:  # a calibrated basis runs no SVD
            asked_rsvd &= df["m_basis"] != "calibrated"
        df.loc[asked_rsvd, "label"] = df["label"] + " → " + df["svd_ran"].fillna("dense")
    return df


def _label(row) -> str:
    """What was asked: 'dense', 'dense bf16', 'tova 4x', 'quantized quanto int4', 'xkv G2 4x pre_rope bf16 q2'.
    A ratio is against a 16-bit cache; rows budgeted against an FP32 cache say ``Nx of fp32``."""
    m = row["m_method"]
    if m == "none":
        return "dense"
    if m == "dense16":
        return "dense bf16"
    budget = ""
    for key, fmt in (("m_ratio", " {:g}x"), ("m_fp32_ratio", " {:g}x of fp32")):
        value = row.get(key)
        if isinstance(value, (int, float)) and value == value:
            budget = fmt.format(value)
    if m == "press":
        return f"{row['m_press']}{budget}"
    if m == "quantized":
        backend = row.get("m_backend")
        return f"quantized {backend if isinstance(backend, str) else 'quanto'} int{int(row.get('m_nbits', 4))}"
    if m == "turboquant":
        return f"turboquant {int(row.get('m_nbits', 3))}-bit"
    def field(name: str):
        value = row.get(f"m_{name}")
        present = isinstance(value, str) or (isinstance(value, (int, float)) and value == value)
        return value if present else getattr(CompressionConfig, name, getattr(TransformConfig, name, None))

    G = row.get("m_layer_group_size")
    G = G if isinstance(G, (int, float)) and G == G else DEFAULT_GROUP_SIZE[m]
    parts = [m + (f" G{int(G)}" if m in ("xkv", "transform") else "") + budget]
    if m == "transform":
        window = transform_window(row.get("m_ratio"))
        window = {k: int(row[f"m_{k}"]) if f"m_{k}" in row and row[f"m_{k}"] == row[f"m_{k}"] else v
                  for k, v in window.items()}
        basis = "calibrated basis" if field("basis") == "calibrated" else "basis"
        parts += [field("key_space"), f"{basis} {field('basis_dtype')}", f"sinks {int(field('sink_tokens'))}",
                  f"window {window['residual_length']}"]
        if window["block_size"] != CompressionConfig.block_size:
            parts.append(f"new blocks {window['block_size']}")
        if field("block_tokens") != TransformConfig.block_tokens:
            parts.append(f"block {int(field('block_tokens'))}")
        if field("value_weight") != TransformConfig.value_weight:
            parts.append(f"V weight {field('value_weight'):g}")
        if field("block_scale") != TransformConfig.block_scale:
            parts.append(f"{field('block_scale')}-scaled blocks")
    elif m != "minicache":
        parts += [field("key_space"), field("factor_dtype")]
    else:
        parts += [field("factor_dtype")]
    if row.get("m_rope_tables") is True:  # rows measured when pre-RoPE keys held FP32 cos/sin tables
        parts.append("cos/sin tables")
    if field("dense_dtype") != CompressionConfig.dense_dtype:
        parts.append(f"dense {field('dense_dtype')}")
    if m in SVD_FACTORISED and field("basis") != "calibrated":
        if field("svd") in ("rsvd", "lowrank_svd"):
            parts.append(f"q{int(field('n_iter'))}")
        if field("qr") != "auto":
            parts.append(f"qr={field('qr')}")
        if field("svd") != "rsvd":
            parts.append(field("svd"))
    return " ".join(parts)
