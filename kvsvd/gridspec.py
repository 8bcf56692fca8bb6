"""A grid's spec: method × task × context length × sample, and what each method entry names.

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

A method entry names a kvsvd method (``kvsvd.methods.METHODS``: its ``CompressionConfig`` fields, and
``ratio``, which asks for that many times fewer KV bytes than a 16-bit dense cache, ``kvsvd.accounting``,
whatever dtype the model computes in) or a peer (``kvsvd.peers.PEERS``: its own keys). A key the named
method does not take is refused. The dense reference (``method: none``, ``DynamicCache`` in the model
dtype) always runs first for every sample.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import ruler
from .methods import METHODS, Method
from .methods.base import present
from .peers import PEERS, Peer

GRID_KEYS = {"name", "model", "tasks", "context_lengths", "n_samples", "seed", "max_new_tokens", "methods", "out",
             "memoize_reads", "budget"}
BUDGETS = ("context", "timeline")


@dataclass(frozen=True)
class Compressed:
    """A grid entry of a kvsvd method: the method and the entry's keys (``CompressionConfig`` fields, its
    params' fields, ``ratio``, ``k_share``)."""
    method: Method
    spec: dict

    family = property(lambda self: self.method.family)
    package = None
    eager = False

    def build(self, model, context_tokens: int, reserve_tokens: int = 0, memoize_reads: bool = False):
        """(LowRankCache, None): a ratio sets the budget (``config_for_ratio``; ``reserve_tokens`` more tokens
        held dense after the context), else the fields are the config (the first layers mod G left dense)."""
        from . import accounting
        from .cache import LowRankCache
        from .config import CompressionConfig, config_for_ratio
        fields = {k: v for k, v in self.spec.items() if k not in ("method", "ratio", "k_share")}
        G = fields.setdefault("layer_group_size", self.method.group_size)
        if self.calibration is not None:
            from .calibrate import default_path
            fields.setdefault("calibration_path", str(default_path(model.config, *self.calibration)))
        if "ratio" in self.spec:
            config = config_for_ratio(self.spec["ratio"], context_tokens, model.config, method=self.method.name,
                                      reserve_tokens=reserve_tokens, k_share=self.spec.get("k_share", 1 / 3),
                                      **fields)
        elif self.method.needs_ratio:
            raise ValueError(f"method {self.spec} needs a ratio: its budget against a 16-bit cache")
        else:
            start = accounting.ModelShape.of(model.config).layers % G
            config = CompressionConfig.of(self.method.name, **{"start_layer": start, **fields})
        return LowRankCache(config, model.config, memoize_reads=memoize_reads), None

    @property
    def calibration(self) -> tuple[int, int] | None:
        """(layer_group_size, start_layer) of the calibration file the entry codes on
        (``kvsvd calibrate``'s default file), or None."""
        if not self.method.reads_calibration(self.spec):
            return None
        return self.spec.get("layer_group_size", self.method.group_size), self.spec.get("start_layer", 0)


def entry(spec: dict) -> Peer | Compressed:
    """What a grid method dict names: a peer or a kvsvd method; an unknown method, or a key it does not take,
    is refused by name."""
    name = spec.get("method")
    if name in PEERS:
        return PEERS[name].of(spec)
    if name not in METHODS:
        raise ValueError(f"method={name!r} is unknown; accepted: {', '.join([*PEERS, *METHODS])}")
    keys = METHODS[name].grid_keys()
    foreign = set(spec) - keys
    if foreign:
        raise ValueError(f"key(s) {sorted(foreign)} do not apply to method {name!r}; accepted: {sorted(keys)}")
    if "ratio" in spec and not (isinstance(spec["ratio"], (int, float)) and spec["ratio"] > 1):
        raise ValueError(f"ratio={spec['ratio']!r} is out of range; accepted: > 1")
    return Compressed(METHODS[name], dict(spec))


def label(spec: dict, ran: dict | None = None) -> str:
    """What a method dict (a grid entry, or a row's recorded method) asked for: ``dense``, ``dense bf16``,
    ``tova 4x``, ``quantized quanto int4``, ``xkv G2 4x pre_rope bf16 q2``. A ratio is against a 16-bit cache.
    ``ran``: a row's recorded config, for the fields whose defaults depend on the model and context
    (``Method.resolved_in_label``: the transform coder's window).
    Rows of earlier variants record keys that no grid runs any more, and their labels say so: a budget against
    an FP32 cache (``fp32_ratio``: ``Nx of fp32``), pre-RoPE keys that held the model's cos/sin tables
    (``rope_tables``: ``cos/sin tables``)."""
    budget = ""
    for key, fmt in (("ratio", " {:g}x"), ("fp32_ratio", " {:g}x of fp32")):
        if present(spec.get(key)):
            budget = fmt.format(spec[key])
    name = spec["method"]
    if name in PEERS:
        peer = PEERS[name]
        return peer.of({k: v for k, v in spec.items() if k in peer.keys()}).label(budget)
    return METHODS[name].label(spec, budget, ran)


def family(name: str) -> str:
    """The report family of method ``name``."""
    return PEERS[name].family if name in PEERS else METHODS[name].family


def runs_svd(spec: dict) -> bool:
    """Whether the method asked for calls an SVD function (its label then names the path that ran)."""
    return spec["method"] in METHODS and METHODS[spec["method"]].runs_svd(spec)


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
    for i, given in enumerate(entries):
        if not isinstance(given, dict) or "method" not in given:
            raise ValueError(f"methods[{i}] must be a mapping with a 'method' key, got {given!r}")
        given = dict(given)
        at = given.pop("context_lengths", context_lengths)
        at = at if isinstance(at, list) else [at]
        if not at or not set(at) <= set(context_lengths):
            raise ValueError(f"methods[{i}].context_lengths={at} is out of range; accepted: a non-empty subset of "
                             f"the grid's context_lengths {context_lengths}")
        keys = list(given)
        for combo in itertools.product(*(_as_list(given[k]) for k in keys)):
            spec = dict(zip(keys, combo))
            try:
                entry(spec)
            except ValueError as e:
                raise ValueError(f"methods[{i}]: {e}") from None
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




class Unit(NamedTuple):
    """One sample of one task at one context length: its cells are the grid's methods at that length."""
    task: str
    context_length: int
    index: int


def units(grid: Grid) -> list[Unit]:
    """Every sample in run order: every task at the shortest length first, so an interrupted grid has whole
    tables at the lengths it finished."""
    return [Unit(t, L, i) for L in sorted(grid.context_lengths) for t in grid.tasks for i in range(grid.n_samples)]


def cells(grid: Grid, among: list[Unit] | None = None) -> list[tuple[Unit, dict]]:
    """(unit, method) of every cell the grid names, in run order (of the units ``among``, by default all)."""
    return [(u, m) for u in (units(grid) if among is None else among) for m in grid.methods_at(u.context_length)]


