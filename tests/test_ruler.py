"""Local RULER tasks: length control with the real tokenizer, determinism, scorers, bad input."""

import pytest

from kvsvd import ruler
from kvsvd.evaluate import split_prompt

pytestmark = pytest.mark.core  # also run in the current environment


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.mark.model
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_samples_fit_the_context_length_exactly_enough(tok, task):
    samples = ruler.generate(task, 2, 1024, tok, seed=3)
    for i, s in enumerate(samples):
        assert set(s) >= {"index", "input", "outputs", "length"} and s["index"] == i
        assert s["length"] <= 1024                          # never longer than asked
        assert all(o in s["context"] for o in s["outputs"])  # every gold value is in the compressed part
        assert 1024 - 64 <= s["length"]
        assert s["input"] == s["context"] + s["question"]
        expected = {"vt": 5, "cwe": 10, "fwe": 3}.get(task) or ruler.NIAH[task].num_v * ruler.NIAH[task].num_q
        assert len(s["outputs"]) == expected


@pytest.mark.model
def test_generation_is_deterministic_per_seed_and_sample(tok):
    a = ruler.generate("niah_multikey_2", 3, 512, tok, seed=5)
    b = ruler.generate("niah_multikey_2", 3, 512, tok, seed=5)
    c = ruler.generate("niah_multikey_2", 3, 512, tok, seed=6)
    assert a == b and a[0]["outputs"] != c[0]["outputs"]
    assert len({s["outputs"][0] for s in a}) == 3


@pytest.mark.model
def test_prompt_split_puts_the_question_after_the_context(tok):
    s = ruler.generate("niah_single_1", 1, 512, tok)[0]
    ctx, question = split_prompt(tok, s)
    assert ctx.shape[1] + question.shape[1] == s["length"] - ruler.TASKS["niah_single_1"].tokens_to_generate
    assert s["outputs"][0] in tok.decode(ctx[0]) and "special magic number for" in tok.decode(question[0])


@pytest.mark.model
def test_bad_input_is_named_and_never_loops(tok):
    with pytest.raises(ValueError, match="task='niah_double' is unknown"):
        ruler.generate("niah_double", 1, 1024, tok)
    with pytest.raises(ValueError, match="cannot fit context_length=200"):
        ruler.generate("niah_multikey_3", 1, 200, tok)
    with pytest.raises(ValueError, match="context_length=100 is out of range"):
        ruler.generate("niah_single_1", 1, 100, tok)
    with pytest.raises(ValueError, match="n_samples=0"):
        ruler.generate("niah_single_1", 0, 1024, tok)


def test_scorers_follow_ruler():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC-def"]
    refs = [["123", "456"], ["789"], ["abc-DEF", "zzz"]]
    assert ruler.string_match_all(preds, refs) == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert ruler.string_match_part(preds, refs) == pytest.approx(100 * 2 / 3)
    assert ruler.score("niah_multivalue", preds, refs) == ruler.string_match_all(preds, refs)
    with pytest.raises(ValueError, match="equal length"):
        ruler.string_match_all(["a"], [])
    with pytest.raises(ValueError, match="task='qa_3'"):
        ruler.score("qa_3", preds, refs)


@pytest.mark.model
def test_vt_cwe_fwe_answers_follow_their_rules(tok):
    vt = ruler.generate("vt", 1, 1024, tok, seed=2)[0]
    value = vt["question"].split("value ")[1].split(" ")[0]
    chain = [vt["context"].split("\n\n", 1)[1].count(f"VAR {v} =") for v in vt["outputs"]]
    assert chain == [1] * 5 and f"= {value}" in vt["context"]
    cwe = ruler.generate("cwe", 1, 1024, tok, seed=2)[0]
    body = cwe["context"].rsplit("Memorize the ones that appear most often.", 1)[1]
    counts = {w: body.count(f". {w} ") + body.endswith(f". {w}\n") for w in cwe["outputs"]}
    assert all(c == 6 for c in counts.values())          # below 4k tokens: common ×6, uncommon ×1
    fwe = ruler.generate("fwe", 1, 2048, tok, seed=2)[0]
    words = fwe["context"].split("coded words. ", 1)[1].split()
    top = sorted(set(words) - {"..."}, key=words.count, reverse=True)[:3]
    assert top == fwe["outputs"] and words.count("...") > words.count(top[0])


class BaseModelTokenizer:
    """A base model's tokenizer (no chat template) that starts prompts with <bos>: one id per character,
    the <bos> text one id."""
    chat_template = None
    bos_token, bos_token_id, add_bos_token = "<bos>", 1000, True

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        import torch
        bos = text.startswith(self.bos_token)
        ids = ([self.bos_token_id] if bos else []) + [ord(c) % 1000 for c in text[len(self.bos_token) * bos:]]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()


def test_a_base_model_reads_rulers_base_format_after_bos():
    """Without a chat template the prompt is <bos>, context, question and the answer prefix (with its
    leading space): the context part starts with <bos> and the question part ends with the prefix."""
    tok = BaseModelTokenizer()
    (s,) = ruler.generate("niah_single_1", 1, 512, tok, seed=0)
    text = ruler.prompt_text(tok, s["context"], s["question"], s["answer_prefix"])
    assert text == "<bos>" + s["context"] + s["question"] + s["answer_prefix"]
    assert s["answer_prefix"].startswith(" ") and text.endswith("? " + s["answer_prefix"].strip())
    ctx, question = split_prompt(tok, s)
    assert ctx[0, 0].item() == tok.bos_token_id and (ctx == tok.bos_token_id).sum() == 1
    assert ctx.shape[1] + question.shape[1] + ruler.TASKS["niah_single_1"].tokens_to_generate == s["length"] <= 512
    tok.add_bos_token = False  # a tokenizer that adds no <bos>: none is written
    assert not ruler.prompt_text(tok, s["context"], s["question"], s["answer_prefix"]).startswith("<bos>")
