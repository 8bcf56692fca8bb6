"""Synthetic RULER tasks generated locally (NVIDIA RULER's definitions), and its scorers.

Tasks: the eight needle tasks (``niah_*``), ``vt`` (variable tracking), ``cwe`` (common words)
and ``fwe`` (frequent words). ``generate(task, n_samples, context_length, tokenizer, seed=0)``
returns samples with RULER's
JSONL fields — ``index``, ``input``, ``outputs`` (gold strings), ``length`` (tokens) — plus
``context`` and ``question`` (the prompt split where kvpress splits it: the context is
prefilled and compressed, the question is not) and ``answer_prefix``. ``length`` counts the
prompt (:func:`prompt_text`: chat-templated, or RULER's base format after ``<bos>`` for a base
model) with its answer prefix plus ``tokens_to_generate``, and never exceeds
``context_length``: the amount of haystack is found by a bounded binary search, and a sample
that cannot fit raises ``ValueError`` instead of looping.

Haystacks ship with the package: ``noise`` (RULER's repeated "The grass is green..."),
``essay`` (English prose from the Python standard library's documentation, in
``kvsvd/data/essays.txt``: RULER's Paul Graham essays cannot be downloaded here) and
``needle`` (distractor needles). Keys are adjective-noun pairs from ``wonderwords``' lists.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Callable
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


Parts = tuple[str, str, str, list[str]]  # context, question, answer_prefix, gold answers


@dataclass(frozen=True)
class Task:
    """A RULER task: ``build(n_units, rng, context_length)`` makes one sample with n haystack units."""
    build: Callable[[int, random.Random, int], Parts]
    tokens_to_generate: int
    max_units: Callable[[int], int]
    metric: str = "string_match_all"


NIAH: dict[str, NiahTask] = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_q=4),
}


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


def _positions(slots: int, k: int, rng: random.Random) -> list[int]:
    """k sorted insertion points in [0, slots): distinct when there is room (as RULER), else repeated."""
    return sorted(rng.sample(range(slots), k) if k <= slots else rng.choices(range(slots), k=k))


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _niah_parts(spec: NiahTask, n_units: int, rng: random.Random) -> Parts:
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
        for index, needle in zip(reversed(_positions(n_units + 1, len(needles), rng)), needles):
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


VT_TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assgined the value {query}, they are: ")  # RULER's spelling, kept for comparability
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. "
                "Find the three most frequently appeared coded words. {context}\n")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def _vt_example(n_noises: int, rng: random.Random, letters: int, hops: int = 4) -> tuple[str, str, list[str]]:
    """One chain "VAR A = 12345", "VAR B = VAR A", ... of ``hops`` hops hidden among noise lines."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    lines = [NOISE] * n_noises
    for offset, pos in enumerate(_positions(n_noises + 1, len(chain), rng)):
        lines.insert(pos + offset, chain[offset])
    return VT_TEMPLATE.format(context="\n".join(lines)), value, names


def _vt_parts(n_units: int, rng: random.Random, _length: int) -> Parts:
    """RULER vt: 1 chain, 4 hops, 5-letter variables, after one solved in-context example."""
    ex_context, ex_value, ex_names = _vt_example(5, rng, letters=3)
    example = (ex_context + VT_QUESTION.format(query=ex_value)
               + VT_ANSWER_PREFIX.format(num_v=len(ex_names), query=ex_value) + " ".join(ex_names) + "\n\n")
    context, value, names = _vt_example(n_units, rng, letters=5)
    return (example + context, VT_QUESTION.format(query=value),
            VT_ANSWER_PREFIX.format(num_v=len(names), query=value), names)


@lru_cache(maxsize=None)
def _cwe_vocabulary() -> tuple[str, ...]:
    assets = resources.files("wonderwords") / "assets"
    words = sorted({w for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
                    for w in (assets / f).read_text().split()})
    random.Random(0).shuffle(words)
    return tuple(words)


def _cwe_list(n_words: int, common_repeats: int, uncommon_repeats: int, rng: random.Random) -> tuple[str, list[str]]:
    chosen = rng.sample(_cwe_vocabulary(), n_words)
    common = chosen[:10]
    words = common * common_repeats + chosen[10:] * uncommon_repeats
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), common


def _cwe_parts(n_units: int, rng: random.Random, length: int) -> Parts:
    """RULER cwe: 10 common words ×30 among uncommon ones ×3 (×6 / ×1 below 4k tokens), numbered,
    after one solved in-context example; ``n_units`` distinct words (at least 10)."""
    short = length < 4096
    ex_list, ex_common = _cwe_list(20 if short else 40, 3 if short else 10, 1 if short else 3, rng)
    example = (CWE_TEMPLATE.format(context=ex_list) + CWE_QUESTION + CWE_ANSWER_PREFIX + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common)) + "\n")
    word_list, common = _cwe_list(max(10, n_units), 6 if short else 30, 1 if short else 3, rng)
    return example + CWE_TEMPLATE.format(context=word_list), CWE_QUESTION, CWE_ANSWER_PREFIX, common


def _fwe_parts(n_units: int, rng: random.Random, length: int) -> Parts:
    """RULER fwe: coded 6-letter words, word k repeated ⌊n·k^-2/ζ(2)⌋ times over a vocabulary of
    length/50 words; rank 1 is the noise "...", the answer is ranks 2-4."""
    size = max(4, length // 50)
    vocab: list[str] = []
    while len(vocab) < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in vocab:
            vocab.append(word)
    vocab[0] = "..."
    zeta2 = math.pi ** 2 / 6
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(n_units * k ** -2.0 / zeta2))]
    rng.shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_QUESTION, FWE_ANSWER_PREFIX, vocab[1:4]


def _niah(spec: NiahTask) -> Task:
    return Task(lambda n, rng, _: _niah_parts(spec, n, rng), 128,
                lambda length: len(_essay_words()) if spec.haystack == "essay" else 4 * length)


TASKS: dict[str, Task] = {name: _niah(spec) for name, spec in NIAH.items()} | {
    "vt": Task(_vt_parts, 30, lambda length: length // 4),
    "cwe": Task(_cwe_parts, 120, lambda length: min(len(_cwe_vocabulary()), length)),
    "fwe": Task(_fwe_parts, 50, lambda length: 4 * length),
}


def prompt_text(tokenizer, context: str, question: str, answer_prefix: str) -> str:
    """The prompt as the model reads it. With a chat template: the user turn holds context + question and
    the assistant turn starts with the answer prefix. A base model (no template) reads RULER's base
    format, context + question + answer prefix, after ``<bos>`` where its tokenizer adds one."""
    text = context + question
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) + answer_prefix.strip()
    bos = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token else ""
    return bos + text + answer_prefix


def prompt_tokens(tokenizer, context: str, question: str, answer_prefix: str) -> int:
    """Tokens of :func:`prompt_text`."""
    return len(tokenizer(prompt_text(tokenizer, context, question, answer_prefix), add_special_tokens=False).input_ids)


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
    max_units = spec.max_units(context_length)
    samples = []
    for index in range(n_samples):
        sample_seed = seed * 1_000_003 + index

        def build(n, sample_seed=sample_seed):
            return spec.build(n, random.Random(sample_seed), context_length)

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
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; accepted: {', '.join(TASKS)}")
    return {"string_match_all": string_match_all, "string_match_part": string_match_part}[TASKS[task].metric](
        predictions, references)
