"""The Triton decode kernel against the PyTorch path: on CPU under Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py before triton is imported), compiled on a GPU with
``TRITON_INTERPRET=0 pytest tests/test_triton_attention.py`` (the ``kernel_device`` fixture)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kvsvd.attention import Factors, attend, attend_with_kernel, kernel_applies  # noqa: E402
from kvsvd.triton_attention import lowrank_decode  # noqa: E402


@pytest.mark.parametrize("T, split", [(1, 64), (70, 64), (300, 128)])
def test_kernel_matches_softmax_over_the_token_factor(T, split, kernel_device):
    g = torch.Generator().manual_seed(T)
    qe, uk, uv = (torch.randn(*shape, generator=g).to(kernel_device) for shape in ((2, 9, 20), (2, T, 20), (2, T, 37)))
    out, lse = lowrank_decode(qe, uk, uv, split=split, block_t=32)
    s = qe @ uk.mT
    torch.testing.assert_close(out, torch.softmax(s, -1) @ uv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="split=100 is out of range"):
        lowrank_decode(qe, uk, uv, split=100, block_t=32)


def test_kernel_reads_bf16_factors_as_stored_and_picks_its_own_tiling(kernel_device):
    g = torch.Generator().manual_seed(1)
    qe, uk, uv = (torch.randn(*shape, generator=g).to(kernel_device) for shape in ((1, 6, 40), (1, 200, 40), (1, 200, 70)))
    uk, uv = uk.bfloat16(), uv.bfloat16()
    out, lse = lowrank_decode(qe, uk, uv)  # default split / block_t
    s = qe @ uk.float().mT
    torch.testing.assert_close(out, torch.softmax(s, -1) @ uv.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


def test_attend_dispatches_decode_steps_to_the_kernel_and_agrees_with_pytorch(kernel_device):
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g).to(kernel_device)  # noqa: E731
    k, v = Factors(r(1, 90, 12), r(1, 12, 3, 8), r(1, 3, 8)), Factors(r(1, 90, 20), r(1, 20, 3, 8), r(1, 3, 8))
    q = r(1, 3, 2, 1, 8)
    mask = torch.ones(1, 1, 1, 1, 90, dtype=torch.bool, device=kernel_device)
    assert kernel_applies(q, k, v, None) and not kernel_applies(q, k, v, mask)
    o_kernel, lse_kernel = attend_with_kernel(q, k, v)
    o_torch, lse_torch = attend(q, k, v, mask)  # a mask sends it down the PyTorch path
    torch.testing.assert_close(o_kernel, o_torch, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse_kernel, lse_torch, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("factor_dtype", ["fp32", "bf16"])
def test_generate_through_the_kernel_matches_reconstruct_on_read(tiny_llama, monkeypatch, factor_dtype, kernel_device):
    import copy

    import kvsvd.attention as attention
    from kvsvd import CompressionConfig, LowRankCache
    calls = []
    monkeypatch.setattr(attention, "attend_with_kernel", lambda *a: calls.append(1) or attend_with_kernel(*a))
    from test_attention import attn
    from test_cache import greedy
    model = tiny_llama if kernel_device == "cpu" else copy.deepcopy(tiny_llama).to(kernel_device)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(8)).to(kernel_device)
    cfg = CompressionConfig.of(method="xkv", layer_group_size=2, rank_k=10, rank_v=16, key_space="post_rope",
                            residual_length=4, factor_dtype=factor_dtype)
    seq, logits = greedy(model, ids, LowRankCache(cfg, model.config), n=6)
    with attn(model, "kvsvd"):
        seq2, logits2 = greedy(model, ids, LowRankCache(cfg, model.config), n=6)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < 1e-4
    assert len(calls) == 5 * 4  # every decode step after the first, in each of the 4 compressed layers
