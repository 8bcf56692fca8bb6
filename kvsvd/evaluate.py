"""Answering one RULER sample with a cache: prefill (and compress) the context, then decode the
question uncompressed, as kvpress's pipeline does."""

from __future__ import annotations

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


@torch.no_grad()
def answer(model, tokenizer, sample: dict, cache, max_new_tokens: int = 32) -> dict:
    """Greedy answer of ``sample`` with ``cache``; returns the text and the time of each phase (ms)."""
    ctx, question = split_prompt(tokenizer, sample)
    dev = model.device
    t0 = time.perf_counter()
    model.model(input_ids=ctx.to(dev), past_key_values=cache)
    t1 = time.perf_counter()
    if isinstance(cache, LowRankCache):
        cache.compress_pending()
    t2 = time.perf_counter()
    logits = model(input_ids=question.to(dev), past_key_values=cache, logits_to_keep=1).logits
    tokens = [int(logits[0, -1].argmax())]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    t3 = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        logits = model(input_ids=torch.tensor([[tokens[-1]]], device=dev), past_key_values=cache).logits
        tokens.append(int(logits[0, -1].argmax()))
    t4 = time.perf_counter()
    return {"prediction": tokenizer.decode(tokens, skip_special_tokens=True), "context_tokens": ctx.shape[1],
            "prefill_ms": (t1 - t0) * 1e3, "compress_ms": (t2 - t1) * 1e3,
            "decode_ms_per_token": (t4 - t3) * 1e3 / max(1, len(tokens) - 1)}
