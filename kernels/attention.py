"""Flash attention (forward and backward) over packed variable-length documents, with grouped-query attention.

One set of kernels serves both entry points: `flash_attn` on (B, S, H, D) is `flash_attn_varlen` on the
(B*S, H, D) view with documents [0, S, 2S, ...].

Forward (FlashAttention-2): each program owns BLOCK_M query rows of one document and one query head, streams
the document's key/value tiles through an online softmax (running max and sum, in base 2: exp2 is one
instruction) and stores the output and the log-sum-exp per row. Causal attention visits only the tiles at
or left of the diagonal; tiles wholly left of it run without any mask, only the diagonal tiles are masked.

Backward (as in FlashAttention-2 and Triton's fused-attention tutorial), three kernels, no atomics:
- preprocess: delta = rowsum(dO * O), per row and query head;
- dK, dV: each program owns BLOCK_N key rows of one KV head and walks the query tiles of every query head
  sharing that KV head (GQA), so the group's contributions add up in registers;
- dQ: each program owns BLOCK_M query rows and walks the key tiles, like the forward.

Layout: q (T, Hq, D), k/v (T, Hkv, D), last dimension contiguous; the log-sum-exp is (Hq, T) float32.
Every tl.dot accumulates in float32 with input_precision="ieee": float32 inputs (used for checks) are not
rounded to TF32; bf16/fp16 inputs are unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import INTERPRET, dispatch, tl, triton

# log2(e): scores are scaled by softmax_scale * LOG2E so the softmax runs on exp2.
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@triton.jit
def _flash_attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n, d_mask,
                          lo, hi, doc_len, qk_scale,
                          MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key tiles [lo, hi). MASKED tiles may straddle the diagonal or the document end."""
    k_ptrs += tl.cast(lo, tl.int64) * stride_kt
    v_ptrs += tl.cast(lo, tl.int64) * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs, mask=d_mask[:, None] & (cols[None, :] < doc_len), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        qk = tl.dot(q, k, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), input_precision="ieee") * qk_scale
        if MASKED:
            valid = cols[None, :] < doc_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        # Every row sees at least one valid key in the first tile it visits (see the callers), so m_new is
        # finite and no exp2(-inf - -inf) appears.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < doc_len) & d_mask[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _flash_attn_fwd_kernel(Q, K, V, O, LSE, cu_seqlens, qk_scale, total_tokens,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                           GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Causal programs with more query tiles have more work: launch them first so the tail of the grid is short.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    doc = tl.program_id(1)
    head = tl.program_id(2)
    doc_start = tl.load(cu_seqlens + doc).to(tl.int64)
    doc_len = (tl.load(cu_seqlens + doc + 1) - tl.load(cu_seqlens + doc)).to(tl.int32)
    if start_m * BLOCK_M >= doc_len:
        return
    kv_head = head // GROUP

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = rows < doc_len

    q_ptrs = Q + doc_start * stride_qt + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    # K is read transposed, (BLOCK_D, BLOCK_N), so q @ k needs no tl.trans.
    k_ptrs = K + doc_start * stride_kt + kv_head * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = V + doc_start * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Tiles left of this query tile are fully visible (BLOCK_M is a multiple of BLOCK_N); the tiles on the
        # diagonal are masked and start at key start_m*BLOCK_M, which every row of this tile may see.
        diag = start_m * BLOCK_M
        acc, m_i, l_i = _flash_attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows,
                                              offs_n, d_mask, 0, diag, doc_len, qk_scale,
                                              False, CAUSAL, BLOCK_N)
        acc, m_i, l_i = _flash_attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows,
                                              offs_n, d_mask, diag, tl.minimum(diag + BLOCK_M, doc_len),
                                              doc_len, qk_scale, True, CAUSAL, BLOCK_N)
    else:
        full = (doc_len // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _flash_attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows,
                                              offs_n, d_mask, 0, full, doc_len, qk_scale,
                                              False, CAUSAL, BLOCK_N)
        acc, m_i, l_i = _flash_attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows,
                                              offs_n, d_mask, full, doc_len, doc_len, qk_scale,
                                              True, CAUSAL, BLOCK_N)

    acc = acc / l_i[:, None]
    o_ptrs = O + doc_start * stride_ot + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    # log-sum-exp in base 2 of the scaled scores: the backward recomputes p = exp2(s * qk_scale - lse).
    tl.store(LSE + head * total_tokens + doc_start + rows, m_i + tl.math.log2(l_i), mask=row_mask)


@triton.jit
def _flash_attn_bwd_preprocess_kernel(O, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_tokens) & (offs_d[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * total_tokens + rows, delta, mask=rows < total_tokens)


@triton.jit
def _flash_attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                               cols, offs_m, d_mask, lo, hi, doc_len, qk_scale,
                               MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi). Query rows past the document load
    lse = +inf, so their probabilities are exactly 0 and they add nothing."""
    q_ptrs += tl.cast(lo, tl.int64) * stride_qt
    do_ptrs += tl.cast(lo, tl.int64) * stride_dot
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < doc_len
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(lse_ptrs + rows, mask=row_mask, other=float("inf"))
        qk_t = tl.dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), input_precision="ieee")
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if MASKED:  # causal diagonal: key col may be seen by query row only if col <= row
            p_t = tl.where(cols[:, None] <= rows[None, :], p_t, 0.0)
        do = tl.load(do_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        delta = tl.load(delta_ptrs + rows, mask=row_mask, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _flash_attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens, qk_scale, softmax_scale,
                                total_tokens,
                                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                                GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0)
    doc = tl.program_id(1)
    kv_head = tl.program_id(2)
    doc_start = tl.load(cu_seqlens + doc).to(tl.int64)
    doc_len = (tl.load(cu_seqlens + doc + 1) - tl.load(cu_seqlens + doc)).to(tl.int32)
    if start_n * BLOCK_N >= doc_len:
        return

    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (cols[:, None] < doc_len) & d_mask[None, :]
    k = tl.load(K + doc_start * stride_kt + kv_head * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + doc_start * stride_vt + kv_head * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(GROUP):  # every query head that reads this KV head
        head = kv_head * GROUP + g
        q_ptrs = Q + doc_start * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO + doc_start * stride_dot + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
        lse_ptrs = LSE + head * total_tokens + doc_start
        delta_ptrs = DELTA + head * total_tokens + doc_start
        if CAUSAL:
            # Queries before this key tile never see it. The tile's diagonal spans queries
            # [start_n*BLOCK_N, +BLOCK_N) (BLOCK_N is a multiple of BLOCK_M); queries after it see it whole.
            diag = start_n * BLOCK_N
            dk, dv = _flash_attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs,
                                                stride_qt, stride_dot, cols, offs_m, d_mask,
                                                diag, tl.minimum(diag + BLOCK_N, doc_len), doc_len, qk_scale,
                                                True, BLOCK_M)
            dk, dv = _flash_attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs,
                                                stride_qt, stride_dot, cols, offs_m, d_mask,
                                                diag + BLOCK_N, doc_len, doc_len, qk_scale,
                                                False, BLOCK_M)
        else:
            dk, dv = _flash_attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs,
                                                stride_qt, stride_dot, cols, offs_m, d_mask,
                                                0, doc_len, doc_len, qk_scale, False, BLOCK_M)

    dk = dk * softmax_scale  # s = softmax_scale * q.k, so ds/dk carries the scale once
    tl.store(DK + doc_start * stride_dkt + kv_head * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + doc_start * stride_dvt + kv_head * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n, d_mask,
                             lo, hi, doc_len, qk_scale,
                             MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi), masked as in the forward."""
    k_ptrs += tl.cast(lo, tl.int64) * stride_kt
    v_ptrs += tl.cast(lo, tl.int64) * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < doc_len) & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), input_precision="ieee")
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            valid = cols[None, :] < doc_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _flash_attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, qk_scale, softmax_scale, total_tokens,
                              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_dot, stride_doh, stride_dqt, stride_dqh,
                              GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    doc = tl.program_id(1)
    head = tl.program_id(2)
    doc_start = tl.load(cu_seqlens + doc).to(tl.int64)
    doc_len = (tl.load(cu_seqlens + doc + 1) - tl.load(cu_seqlens + doc)).to(tl.int32)
    if start_m * BLOCK_M >= doc_len:
        return
    kv_head = head // GROUP

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = rows < doc_len
    tile_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + doc_start * stride_qt + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=tile_mask, other=0.0)
    do = tl.load(DO + doc_start * stride_dot + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=tile_mask, other=0.0)
    lse = tl.load(LSE + head * total_tokens + doc_start + rows, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + head * total_tokens + doc_start + rows, mask=row_mask, other=0.0)
    k_ptrs = K + doc_start * stride_kt + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + doc_start * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        diag = start_m * BLOCK_M
        dq = _flash_attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                      d_mask, 0, diag, doc_len, qk_scale, False, CAUSAL, BLOCK_N)
        dq = _flash_attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                      d_mask, diag, tl.minimum(diag + BLOCK_M, doc_len), doc_len, qk_scale,
                                      True, CAUSAL, BLOCK_N)
    else:
        full = (doc_len // BLOCK_N) * BLOCK_N
        dq = _flash_attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                      d_mask, 0, full, doc_len, qk_scale, False, CAUSAL, BLOCK_N)
        dq = _flash_attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, offs_n,
                                      d_mask, full, doc_len, doc_len, qk_scale, True, CAUSAL, BLOCK_N)

    dq = dq * softmax_scale
    tl.store(DQ + doc_start * stride_dqt + head * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=tile_mask)


# Tile sizes and warps on the GPU: the forward's (128, 64) and dQ's (128, 32) tiles follow Triton's
# fused-attention tutorial (tuned there for H100); the dK/dV tiles are the largest that compile for sm_90
# without register spills (ptxas: (32, 128) at D=64 uses 244 registers, (16, 128) at D=128 uses 247; the
# tutorial's (32, 128) spills 248 bytes at D=128). Neither is timed here: bench/kernels.py measures them.
# In the interpreter each tile op is a numpy call, so small tiles only add calls, but tiles must stay small
# enough that short test sequences span several of them and exercise the diagonal and boundary masks.
def _fwd_config(head_dim: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=3)


def _bwd_configs(head_dim: int) -> tuple[dict, dict]:
    """(dK/dV config, dQ config). dK/dV needs BLOCK_N % BLOCK_M == 0, dQ BLOCK_M % BLOCK_N == 0."""
    if INTERPRET:
        return (dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1),
                dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1))
    return (dict(BLOCK_M=32 if head_dim <= 64 else 16, BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3))


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"flash_attn_varlen wants q (T, Hq, D) and k, v (T, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"flash_attn: k and v must both be (T, Hkv, D) with q's T and D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"flash_attn: query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attn: q, k, v must share one dtype among float16, bfloat16, float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"flash_attn: q, k, v and cu_seqlens must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {cu_seqlens.device}")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attn: head dim {q.shape[2]} is above the supported {MAX_HEAD_DIM}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(f"flash_attn_varlen: cu_seqlens must be int32 (n_docs + 1,) from 0 to T; got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() - 1 > 65535:  # documents are the grid's second axis, which CUDA caps at 65535
        raise ValueError(f"flash_attn_varlen: {cu_seqlens.numel() - 1} documents in one call; at most 65535")
    if max_seqlen < 1:
        raise ValueError(f"flash_attn_varlen: max_seqlen must be >= the longest document (>= 1); got {max_seqlen}")
    # Offsets within a document are 32-bit (rows * token stride); the document's start is 64-bit.
    if max_seqlen * max(t.stride(0) for t in (q, k, v)) >= 2**31:
        raise ValueError(f"flash_attn_varlen: a document of {max_seqlen} tokens with token strides "
                         f"{q.stride(0)}, {k.stride(0)}, {v.stride(0)} needs offsets past 2^31 elements; split it")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_attn_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                           softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward: o (T, Hq, D) in q's dtype and lse (Hq, T) float32, base 2."""
    total, n_heads, head_dim = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(n_heads, total, device=q.device, dtype=torch.float32)
    cfg = _fwd_config(head_dim)
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), cu_seqlens.numel() - 1, n_heads)
    _flash_attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, softmax_scale * LOG2E, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        GROUP=n_heads // k.shape[1], CAUSAL=causal, HEAD_DIM=head_dim,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def _flash_attn_varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens: Tensor,
                           max_seqlen: int, causal: bool, softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    total, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    n_docs = cu_seqlens.numel() - 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    delta = torch.empty_like(lse)
    pre_rows = 64
    _flash_attn_bwd_preprocess_kernel[(triton.cdiv(total, pre_rows), n_heads)](
        o, do, delta, total, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=pre_rows, BLOCK_D=block_d)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kv_cfg, q_cfg = _bwd_configs(head_dim)
    common = dict(GROUP=n_heads // n_kv_heads, CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d)
    _flash_attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, kv_cfg["BLOCK_N"]), n_docs, n_kv_heads)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, softmax_scale * LOG2E, softmax_scale, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        **common, **kv_cfg)
    _flash_attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, q_cfg["BLOCK_M"]), n_docs, n_heads)](
        q, k, v, do, lse, delta, dq, cu_seqlens, softmax_scale * LOG2E, softmax_scale, total,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        **common, **q_cfg)
    return dq, dk, dv


class FlashAttnVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.softmax_scale = max_seqlen, causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _flash_attn_varlen_bwd(_last_dim_contiguous(do), q, k, v, o, lse, cu_seqlens,
                                            ctx.max_seqlen, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


def attention_torch(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None) -> Tensor:
    """The PyTorch fallback: SDPA on each document (differentiable, GQA through enable_gqa).

    q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D). Reads cu_seqlens on the host (one sync).
    """
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale,
                                                   enable_gqa=True).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool = True,
                      softmax_scale: float | None = None) -> Tensor:
    """Attention within each of several documents packed along one token axis.

    q: (total_tokens, nheads, headdim); k, v: (total_tokens, nheads_kv, headdim), nheads % nheads_kv == 0
    (query head h reads key/value head h // (nheads / nheads_kv)). cu_seqlens: int32 (n_docs + 1,), document
    i is tokens [cu_seqlens[i], cu_seqlens[i+1]), from 0 to total_tokens; empty documents are allowed.
    max_seqlen: an int >= the longest document (it sizes the grid; rows beyond it are not computed, so an
    underestimate leaves them unwritten). causal: token i sees tokens j <= i of its own document.
    softmax_scale: defaults to 1/sqrt(headdim). Returns (total_tokens, nheads, headdim) in q's dtype.
    """
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    max_seqlen = int(max_seqlen)
    _check(q, k, v, cu_seqlens, max_seqlen)
    if dispatch("flash_attn", q.device) == "torch":
        return attention_torch(q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale)
    return FlashAttnVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, float(softmax_scale))


def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, softmax_scale: float | None = None) -> Tensor:
    """Attention over a batch of equal-length sequences.

    q: (batch, seqlen, nheads, headdim); k, v: (batch, seqlen, nheads_kv, headdim), nheads % nheads_kv == 0.
    Returns (batch, seqlen, nheads, headdim) in q's dtype. causal and softmax_scale as in flash_attn_varlen.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attn wants q (B, S, Hq, D) and k, v (B, S, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, seq = q.shape[:2]
    if k.shape[:2] != (batch, seq) or v.shape[:2] != (batch, seq):
        raise ValueError(f"flash_attn: q, k, v must share (batch, seqlen); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    # (B, S, H, D) flattened over (B, S) is the packed layout with one document per row.
    q3, k3, v3 = (t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v))
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
    _check(q3, k3, v3, cu_seqlens, max(seq, 1))
    if dispatch("flash_attn", q.device) == "torch":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)
    out = FlashAttnVarlenFunction.apply(q3, k3, v3, cu_seqlens, max(seq, 1), causal, float(softmax_scale))
    return out.view(q.shape)
