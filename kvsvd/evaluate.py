"""Answering one RULER sample with a cache: prefill (and compress) the context, then decode the
question uncompressed, as kvpress's pipeline does; positions are explicit, so a press that
evicts context tokens does not shift the question's RoPE positions."""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from .cache import LowRankCache


def split_prompt(tokenizer, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, n) of the chat-templated context part and of the question part (question,
    end of the user turn, assistant header and the answer prefix)."""
    text = sample["context"] + sample["question"]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    text += sample["answer_prefix"].strip()
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
        return model(input_ids=ids, past_key_values=cache, position_ids=_positions(start, ids.shape[1], ids.device)).logits
    return torch.cat([model(input_ids=ids[:, j:j + 1], past_key_values=cache,
                            position_ids=_positions(start + j, 1, ids.device)).logits for j in range(ids.shape[1])], 1)


def _prefill(model, ctx: torch.Tensor, cache, press) -> None:
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ctx.to(model.device), past_key_values=cache)


@torch.no_grad()
def answer(model, tokenizer, sample: dict, cache, max_new_tokens: int = 32, press=None,
           gold: str | None = None, new_cache=None,
           prompt: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Greedy answer of ``sample`` with ``cache`` (prefill under ``press`` when given).

    Returns the prediction, the time of each phase (ms), and with ``gold`` the log-likelihood of
    the gold answer under teacher forcing, computed on a copy of the compressed cache (or, for a
    cache that cannot be deep-copied such as quanto's, on a second prefill into ``new_cache()``).
    ``prompt`` is ``split_prompt``'s result when the caller already has it.
    """
    ctx, question = prompt if prompt is not None else split_prompt(tokenizer, sample)
    dev, n_ctx = model.device, ctx.shape[1]
    t0 = time.perf_counter()
    _prefill(model, ctx, cache, press)
    t1 = time.perf_counter()
    if isinstance(cache, LowRankCache):
        cache.compress_pending()
    t2 = time.perf_counter()
    out: dict = {"context_tokens": n_ctx, "prefill_ms": (t1 - t0) * 1e3, "compress_ms": (t2 - t1) * 1e3}
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
            _prefill(model, ctx, forced_cache, press)
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
        logits = model(input_ids=torch.tensor([[tokens[-1]]], device=dev), past_key_values=cache,
                       position_ids=_positions(pos + len(tokens) - 1, 1, dev)).logits
        tokens.append(int(logits[0, -1].argmax()))
    t4 = time.perf_counter()
    out.update(prediction=tokenizer.decode(tokens, skip_special_tokens=True),
               decode_ms_per_token=(t4 - t3) * 1e3 / max(1, len(tokens) - 1), new_tokens=len(tokens),
               processed_tokens=pos + len(tokens) - 1)  # every token whose K/V entered the cache
    return out
