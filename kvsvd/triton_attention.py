"""Triton kernel for one decode step over a low-rank segment (split-T "flash decoding").

Inputs are the factor-space query ``qe = q·W_kᵀ`` (B, M, r_k) — M = all query heads of the
layer, pre-scaled — and the group's token factors U_k (B, T, r_k), U_v (B, T, r_v). Program
(b, s) streams tokens [s·split, (s+1)·split) once for all M heads: scores qe·U_kᵀ, online
softmax, accumulation of p·U_v. It writes a normalised partial output and its log-sum-exp;
the splits are merged exactly on the host. The caller applies W_v (r_v × d per head).

``kvsvd.attention`` uses it on CUDA for decode steps (one query token, no mask) when both K
and V of a segment are factors; everything else takes the PyTorch path, which computes the
same quantities. On a CPU the kernel runs under ``TRITON_INTERPRET=1`` (the tests do).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _lowrank_decode_kernel(Q, UK, UV, O, LSE, T, M, RK, RV, split,
                           s_qb, s_qm, s_kb, s_kt, s_vb, s_vt, s_ob, s_os, s_om, s_lb, s_ls,
                           BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_RK: tl.constexpr,
                           BLOCK_RV: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_RK)
    rv = tl.arange(0, BLOCK_RV)
    q = tl.load(Q + b * s_qb + rows[:, None] * s_qm + rk[None, :],
                mask=(rows[:, None] < M) & (rk[None, :] < RK), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_RV], tl.float32)
    start = s * split
    end = tl.minimum(start + split, T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        live = t < end
        uk = tl.load(UK + b * s_kb + t[:, None] * s_kt + rk[None, :], mask=live[:, None] & (rk[None, :] < RK),
                     other=0.0).to(tl.float32)
        sc = tl.dot(q, tl.trans(uk), input_precision="ieee")                     # (BLOCK_M, BLOCK_T)
        sc = tl.where(live[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        uv = tl.load(UV + b * s_vb + t[:, None] * s_vt + rv[None, :], mask=live[:, None] & (rv[None, :] < RV),
                     other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, uv, input_precision="ieee")
        m_i = m_new
    tl.store(O + b * s_ob + s * s_os + rows[:, None] * s_om + rv[None, :], acc / l_i[:, None],
             mask=(rows[:, None] < M) & (rv[None, :] < RV))
    tl.store(LSE + b * s_lb + s * s_ls + rows, m_i + tl.log(l_i), mask=rows < M)


@functools.lru_cache(maxsize=None)
def _programs(device_index: int | None) -> int:
    """About four programs per multiprocessor (looked up once per device, not on every step)."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def lowrank_decode(qe: Tensor, uk: Tensor, uv: Tensor, split: int | None = None,
                   block_t: int | None = None) -> tuple[Tensor, Tensor]:
    """softmax(qe·U_kᵀ)·U_v for qe (B, M, r_k), U_k (B, T, r_k), U_v (B, T, r_v).

    U_k/U_v are read in their stored dtype (float32, bfloat16 or float16) and upcast in registers,
    so BF16 factors cost half the bytes of FP32 ones; scores, softmax and sums are float32.
    ``block_t`` tokens per inner step (default: by rank, keeping a tile of U ≤ 8192 entries);
    ``split`` tokens per program (default: about four programs per multiprocessor on CUDA).
    Returns (out (B, M, r_v), lse (B, M)) in float32: the normalised output and the log-sum-exp.
    """
    B, M, RK = qe.shape
    T, RV = uk.shape[1], uv.shape[2]
    if uk.shape[:2] != uv.shape[:2] or uk.shape[2] != RK:
        raise ValueError(f"shapes qe {tuple(qe.shape)}, uk {tuple(uk.shape)}, uv {tuple(uv.shape)} do not match")
    pow2 = lambda x: max(16, triton.next_power_of_2(x))  # noqa: E731  (tl.dot needs dims >= 16)
    if block_t is None:
        block_t = max(16, min(64, triton.next_power_of_2(8192 // (pow2(RK) + pow2(RV)) + 1) // 2))
    if split is None:
        programs = _programs(qe.device.index) if qe.is_cuda else 8
        split = block_t * max(1, triton.cdiv(T, programs * block_t))
    if split < block_t or split % block_t:
        raise ValueError(f"split={split} is out of range; accepted: a positive multiple of block_t={block_t}")
    qe = qe.float().contiguous()
    uk, uv = (x if x.stride(-1) == 1 else x.contiguous() for x in (uk, uv))
    S = triton.cdiv(T, split)
    out = torch.empty(B, S, M, RV, dtype=torch.float32, device=qe.device)
    lse = torch.empty(B, S, M, dtype=torch.float32, device=qe.device)
    _lowrank_decode_kernel[(B, S)](qe, uk, uv, out, lse, T, M, RK, RV, split,
                                   qe.stride(0), qe.stride(1), uk.stride(0), uk.stride(1), uv.stride(0), uv.stride(1),
                                   out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                                   BLOCK_M=pow2(M), BLOCK_T=block_t, BLOCK_RK=pow2(RK), BLOCK_RV=pow2(RV))
    total = torch.logsumexp(lse, dim=1)
    return (torch.exp(lse - total[:, None])[..., None] * out).sum(1), total
