"""Synthetic RULER tasks generated locally (NVIDIA RULER's definitions), and its scorers.

``generate(task, n_samples, context_length, tokenizer, seed=0)`` returns samples with RULER's
JSONL fields — ``index``, ``input``, ``outputs`` (gold strings), ``length`` (tokens) — plus
``context`` and ``question`` (the prompt split where kvpress splits it: the context is
prefilled and compressed, the question is not) and ``answer_prefix``. ``length`` counts the
chat-templated prompt with its answer prefix plus ``tokens_to_generate``, and never exceeds
``context_length``: the amount of haystack is found by a bounded binary search, and a sample
that cannot fit raises ``ValueError`` instead of looping.

Haystacks ship with the package: ``noise`` (RULER's repeated "The grass is green..."),
``essay`` (English prose from the Python standard library's documentation, in
``kvsvd/data/essays.txt``: RULER's Paul Graham essays cannot be downloaded here) and
``needle`` (distractor needles). Keys are adjective-noun pairs from ``wonderwords``' lists.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # 40 evenly spaced depths, in percent
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n")
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"


@dataclass(frozen=True)
class NiahTask:
    haystack: str   # noise | essay | needle
    type_k: str     # words | numbers | uuids
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    tokens_to_generate: int = 128


TASKS: dict[str, NiahTask] = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_q=4),
}
SCORERS = {name: "string_match_all" for name in TASKS}


@lru_cache(maxsize=None)
def _word_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """wonderwords' adjectives and nouns; a key is one of each, drawn independently (the same
    distribution as RULER's product list, without materialising its ~10M strings)."""
    assets = resources.files("wonderwords") / "assets"
    return tuple(sorted(set((assets / "adjectivelist.txt").read_text().split()))), \
        tuple(sorted(set((assets / "nounlist.txt").read_text().split())))


@lru_cache(maxsize=None)
def _essay_words() -> tuple[str, ...]:
    return tuple((resources.files("kvsvd") / "data" / "essays.txt").read_text().split())


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjs, nouns = _word_lists()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r} is unknown; accepted: numbers, words, uuids")


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _niah_parts(spec: NiahTask, n_units: int, rng: random.Random) -> tuple[str, str, str, list[str]]:
    """(context, question, answer_prefix, gold answers) with ``n_units`` haystack units."""
    keys, values, needles = [], [], []
    for _ in range(max(spec.num_k, spec.num_q)):
        keys.append(_random(spec.type_k, rng))
        values.append([_random(spec.type_v, rng) for _ in range(spec.num_v)])
        needles += [NEEDLE.format(type_v=spec.type_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if spec.haystack == "essay":
        words = _essay_words()
        start = rng.randrange(max(1, len(words) - n_units))
        sents = _split_sentences(" ".join(words[start:start + n_units]))
        cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        parts, last = [], 0
        for cut, needle in zip(cuts, needles):
            parts += sents[last:cut] + [needle]
            last = cut
        context = " ".join(parts + sents[last:])
    else:
        if spec.haystack == "noise":
            lines = [NOISE] * n_units
        else:
            lines = [NEEDLE.format(type_v=spec.type_v, key=_random(spec.type_k, rng), value=_random(spec.type_v, rng))
                     for _ in range(n_units)]
        for index, needle in zip(sorted(rng.sample(range(n_units + 1), len(needles)), reverse=True), needles):
            lines.insert(index, needle)
        context = "\n".join(lines)
    asked = rng.sample(range(len(keys)), spec.num_q)
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if spec.num_q > 1 else keys[asked[0]]
    answers = [v for i in asked for v in values[i]]
    type_v, template, question = spec.type_v, NIAH_TEMPLATE, NIAH_QUESTION
    answer_prefix = NIAH_ANSWER_PREFIX
    if spec.num_q * spec.num_v == 1:  # RULER's singular wording
        type_v = type_v[:-1]
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        question = question.replace("are all", "is")
        answer_prefix = answer_prefix.replace("are", "is")
    return (template.format(type_v=type_v, context=context), question.format(type_v=type_v, query=query),
            answer_prefix.format(type_v=type_v, query=query), answers)


def prompt_tokens(tokenizer, context: str, question: str, answer_prefix: str) -> int:
    """Tokens of the chat-templated prompt (user: context + question; assistant: answer prefix)."""
    text = context + question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return len(tokenizer(text + answer_prefix.strip(), add_special_tokens=False).input_ids)


def generate(task: str, n_samples: int, context_length: int, tokenizer, seed: int = 0,
             max_search_steps: int = 24) -> list[dict]:
    """``n_samples`` samples of ``task`` whose prompt + generation budget fits ``context_length`` tokens."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; accepted: {', '.join(TASKS)}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} is out of range; accepted: >= 1")
    spec = TASKS[task]
    budget = context_length - spec.tokens_to_generate
    model_max = getattr(tokenizer, "model_max_length", None)
    if budget < 1 or (model_max and model_max < 10**9 and context_length > model_max):
        raise ValueError(f"context_length={context_length} is out of range for this task and tokenizer; "
                         f"accepted: ({spec.tokens_to_generate}, {model_max}]")
    max_units = len(_essay_words()) if spec.haystack == "essay" else 4 * context_length
    samples = []
    for index in range(n_samples):
        sample_seed = seed * 1_000_003 + index

        def build(n):
            return _niah_parts(spec, n, random.Random(sample_seed))

        def length(n):
            c, q, p, _ = build(n)
            return prompt_tokens(tokenizer, c, q, p)

        lo, hi = 0, max_units  # largest n with length(n) <= budget, in at most max_search_steps steps
        if length(lo) > budget:
            raise ValueError(f"task={task!r} cannot fit context_length={context_length}: even an empty haystack "
                             f"needs {length(lo) + spec.tokens_to_generate} tokens")
        for _ in range(max_search_steps):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if length(mid) <= budget else (lo, mid)
        else:
            raise ValueError(f"task={task!r}: the haystack size search did not converge in {max_search_steps} steps")
        context, question, prefix, answers = build(lo)
        n_tokens = prompt_tokens(tokenizer, context, question, prefix)
        samples.append({"index": index, "input": context + question, "outputs": answers,
                        "length": n_tokens + spec.tokens_to_generate, "context": context, "question": question,
                        "answer_prefix": prefix, "haystack_units": lo, "seed": sample_seed})
    return samples


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER: mean over samples of the fraction of gold strings found (case-insensitive), × 100."""
    _check(predictions, references)
    return 100.0 * sum(sum(r.lower() in p.lower() for r in refs) / len(refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """RULER (qa): mean over samples of whether any gold string is found, × 100."""
    _check(predictions, references)
    return 100.0 * sum(max(r.lower() in p.lower() for r in refs)
                       for p, refs in zip(predictions, references)) / len(predictions)


def _check(predictions, references) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) must be "
                         "non-empty and of equal length")


def score(task: str, predictions: list[str], references: list[list[str]]) -> float:
    """The task's RULER metric, 0–100."""
    if task not in SCORERS:
        raise ValueError(f"task={task!r} is unknown; accepted: {', '.join(SCORERS)}")
    return {"string_match_all": string_match_all, "string_match_part": string_match_part}[SCORERS[task]](
        predictions, references)
