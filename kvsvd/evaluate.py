"""Answering one RULER sample with a cache: prefill (and compress) the context, then decode the
question uncompressed, as kvpress's pipeline does; positions are explicit, so a press that
evicts context tokens does not shift the question's RoPE positions.

A grid answers one sample with many caches. The prefill forward is the same for all of them
(a cache or press changes what is *kept*, never what the context's layers compute: a press
prunes layer l after layer l has attended), so :func:`record_prefill` runs it once and
:func:`replay_prefill` fills each cache from the record: the same ``update`` calls with the
same K/V and cos/sin, then the press's own forward hook with the same arguments. A press that
reads the forward's own outputs (ObservedAttention: eager attention weights, too large to record)
cannot be replayed; :func:`fan_out_prefill` fills several such caches (one press class, several
ratios) from one forward instead."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cache import LowRankCache
from . import ruler
from .compat import cache_of, with_cache


def split_prompt(tokenizer, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, n) of the prompt's context part and of its question part (``ruler.prompt_text``:
    the question, then the end of the user turn and the assistant header where there is a chat
    template, and the answer prefix)."""
    text = ruler.prompt_text(tokenizer, sample["context"], sample["question"], sample["answer_prefix"])
    cut = text.index(sample["question"])
    enc = lambda s: tokenizer(s, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
    return enc(text[:cut]), enc(text[cut:])


def _positions(start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device).unsqueeze(0)


def _forward(model, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
    """Logits (1, n, V) of ``ids`` placed at positions start.. on ``cache``. When the layers hold
    different numbers of tokens (a press with per-layer budgets, e.g. PyramidKV), transformers'
    causal mask (sized from layer 0) cannot serve a multi-token step: feed one token at a time."""
    if len({cache.get_seq_length(i) for i in range(len(cache.layers))}) == 1:
        return model(input_ids=ids, **with_cache(cache), position_ids=_positions(start, ids.shape[1], ids.device)).logits
    return torch.cat([model(input_ids=ids[:, j:j + 1], **with_cache(cache),
                            position_ids=_positions(start + j, 1, ids.device)).logits for j in range(ids.shape[1])], 1)


def prefill_context(model, ctx: torch.Tensor, cache, press) -> None:
    """Fill ``cache`` with the context ``ctx`` (1, T) in one forward of the base model (no logits), under ``press``
    (its hooks prune as the forward goes) when given."""
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ctx.to(model.device), **with_cache(cache))


@dataclass
class Prefill:
    """A recorded dense prefill of ``n_tokens`` context tokens: per attention layer the call's
    kwargs (hidden_states (1, T, hidden), position_embeddings cos/sin (1, T, d), mask,
    cache_position), the post-RoPE keys/values (1, H_kv, T, d) it appended and its output
    (attn_output, attn_weights); ``ms`` the forward's wall time."""
    calls: list[tuple[dict, torch.Tensor, torch.Tensor, tuple]]
    n_tokens: int
    ms: float


@dataclass
class Filled:
    """A cache :func:`fan_out_prefill` has filled already with ``n_tokens`` context tokens, in a
    forward of ``ms`` shared with other caches."""
    cache: object
    n_tokens: int
    ms: float


@torch.no_grad()
def record_prefill(model, ctx: torch.Tensor) -> Prefill:
    """Run the dense prefill of ``ctx`` (1, T) once and record what each attention layer saw."""
    calls: list = []

    def hook(module, args, kwargs, output):
        cache = cache_of(kwargs)
        layer = cache.layers[module.layer_idx]
        calls.append(({k: v for k, v in kwargs.items() if v is not cache}, layer.keys, layer.values, output))

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        t0 = time.perf_counter()
        prefill_context(model, ctx, DynamicCache(), None)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        for h in hooks:
            h.remove()
    return Prefill(calls, ctx.shape[1], ms)


def _fill_layer(module, kwargs: dict, keys: torch.Tensor, values: torch.Tensor, output: tuple, cache, press) -> None:
    """What one attention layer's forward does to ``cache`` under ``press``, given what it saw and
    produced: ``update`` with copies of its K/V (no cache aliases another), then the press's hook."""
    cos, sin = kwargs["position_embeddings"]
    cache.update(keys.clone(), values.clone(), module.layer_idx,
                 {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")})
    if press is not None:
        press.forward_hook(module, (), {**kwargs, **with_cache(cache)}, output)


def replay_prefill(model, prefill: Prefill, cache, press=None) -> None:
    """Fill ``cache`` exactly as ``model.model(ctx, **with_cache(cache))`` under ``press`` would,
    without the forward: each recorded layer call through :func:`_fill_layer`."""
    with press(model) if press is not None else contextlib.nullcontext():
        for layer, (kwargs, keys, values, output) in zip(model.model.layers, prefill.calls):
            _fill_layer(layer.self_attn, kwargs, keys, values, output, cache, press)


@torch.no_grad()
def fan_out_prefill(model, ctx: torch.Tensor, targets: list[tuple[object, object]]) -> list[Filled]:
    """Fill every ``(cache, press)`` of ``targets`` from one prefill forward of ``ctx`` (1, T): the
    first as its own prefill under its press, each other as :func:`replay_prefill` would from that
    forward's layer calls, taken live (before the first press prunes) and not kept. The presses must
    be of one class: the first's context (``press(model)``) serves them all."""
    (first, press), rest = targets[0], targets[1:]
    if any(type(p) is not type(press) for _, p in rest):
        raise ValueError(f"fan_out_prefill needs presses of one class, got {sorted({type(p).__name__ for _, p in targets})}")

    def hook(module, args, kwargs, output):
        layer = cache_of(kwargs).layers[module.layer_idx]
        for cache, other in rest:
            _fill_layer(module, kwargs, layer.keys, layer.values, output, cache, other)

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:  # registered before the press enters: they run before its hooks prune the forward's cache
        t0 = time.perf_counter()
        prefill_context(model, ctx.to(model.device), first, press)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        for h in hooks:
            h.remove()
    return [Filled(cache, ctx.shape[1], ms) for cache, _ in targets]


@torch.no_grad()
def answer(model, tokenizer, sample: dict, cache, max_new_tokens: int = 32, press=None,
           gold: str | None = None, new_cache=None,
           prompt: tuple[torch.Tensor, torch.Tensor] | None = None, prefill: Prefill | Filled | None = None) -> dict:
    """Greedy answer of ``sample`` with ``cache`` (prefill under ``press`` when given).

    Returns the prediction, the time of each phase (ms), and with ``gold`` the log-likelihood of
    the gold answer under teacher forcing, computed on a copy of the compressed cache (or, for a
    cache that cannot be deep-copied such as quanto's, on a second prefill into ``new_cache()``).
    ``prompt`` is ``split_prompt``'s result when the caller already has it. With ``prefill`` (the
    context's :func:`record_prefill`) the cache is filled by replay: ``prefill_ms`` is then the
    recorded forward's and ``replay_ms`` the replay's (for a press: its scoring and pruning); with
    a :class:`Filled` (of this very ``cache``) it is filled already and ``prefill_ms`` is the shared
    forward's; ``compress_ms`` is always LowRankCache's compression of the prefill alone.
    """
    ctx, question = prompt if prompt is not None else split_prompt(tokenizer, sample)
    dev, n_ctx = model.device, ctx.shape[1]
    if prefill is not None and prefill.n_tokens != n_ctx:
        raise ValueError(f"prefill holds {prefill.n_tokens} tokens but the context has {n_ctx}: record it for this sample")
    if isinstance(prefill, Filled) and prefill.cache is not cache:
        raise ValueError("answer(prefill=Filled(...)) must be given the cache it filled")

    def fill(target) -> None:
        if prefill is None:
            prefill_context(model, ctx, target, press)
        elif isinstance(prefill, Filled):
            if target is not cache:
                raise ValueError("a cache filled by fan_out_prefill cannot be filled again: it must be deep-copyable")
        else:
            replay_prefill(model, prefill, target, press)

    t0 = time.perf_counter()
    fill(cache)
    t1 = time.perf_counter()
    if isinstance(cache, LowRankCache):
        cache.compress_pending()
    t2 = time.perf_counter()
    out: dict = {"context_tokens": n_ctx, "prefill_shared": prefill is not None, "compress_ms": (t2 - t1) * 1e3}
    if prefill is None:
        out["prefill_ms"] = (t1 - t0) * 1e3
    elif isinstance(prefill, Filled):  # one forward shared with other caches
        out["prefill_ms"] = prefill.ms
    else:  # the recorded forward, and the replay (copies of K/V, the press's scoring and pruning)
        out.update(prefill_ms=prefill.ms, replay_ms=(t1 - t0) * 1e3)
    if isinstance(cache, LowRankCache):
        out["compression_log"] = cache.compression_log
    if gold is not None:
        gold_ids = tokenizer(gold, add_special_tokens=False, return_tensors="pt").input_ids.to(dev)
        forced = torch.cat([question.to(dev), gold_ids], dim=1)
        try:
            forced_cache = copy.deepcopy(cache)
        except RuntimeError:
            if new_cache is None:
                raise
            forced_cache = new_cache()
            fill(forced_cache)
        logits = _forward(model, forced, forced_cache, n_ctx)
        logp = logits[0, question.shape[1] - 1:-1].float().log_softmax(-1)
        out["gold_logprob"] = float(logp.gather(-1, gold_ids[0, :, None]).sum())
        out["gold_tokens"] = gold_ids.shape[1]
    pos = n_ctx + question.shape[1]
    logits = _forward(model, question.to(dev), cache, n_ctx)
    tokens = [int(logits[0, -1].argmax())]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    t3 = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        logits = model(input_ids=torch.tensor([[tokens[-1]]], device=dev), **with_cache(cache),
                       position_ids=_positions(pos + len(tokens) - 1, 1, dev)).logits
        tokens.append(int(logits[0, -1].argmax()))
    t4 = time.perf_counter()
    out.update(prediction=tokenizer.decode(tokens, skip_special_tokens=True),
               decode_ms_per_token=(t4 - t3) * 1e3 / max(1, len(tokens) - 1), new_tokens=len(tokens),
               processed_tokens=pos + len(tokens) - 1)  # every token whose K/V entered the cache
    return out
