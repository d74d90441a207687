"""flash_attn and flash_attn_varlen against a float64 reference: output and dQ, dK, dV, over odd lengths,
uneven packed documents (length 1 and empty ones too), GQA ratios 1, 4 and 8, head dims 16-128."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import flash_attn, flash_attn_varlen, force_implementation
from tests.unit.kernels.checks import TOLERANCES, assert_close, check_op


def attention_reference(q, k, v, cu_seqlens, causal, softmax_scale=None):
    """Plain attention per document in the inputs' own dtype (float64 inputs give the exact reference,
    half inputs PyTorch's own rounding). q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)  # (Hq, L, D)
        kd = k[start:end].transpose(0, 1).repeat_interleave(group, 0)
        vd = v[start:end].transpose(0, 1).repeat_interleave(group, 0)
        scores = qd @ kd.transpose(1, 2) * scale
        if causal:
            visible = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            scores = scores.masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(outs)


def _inputs(total, n_heads, n_kv_heads, head_dim, dtype):
    q = torch.randn(total, n_heads, head_dim, dtype=dtype)
    k = torch.randn(total, n_kv_heads, head_dim, dtype=dtype)
    v = torch.randn(total, n_kv_heads, head_dim, dtype=dtype)
    return q, k, v


def _check_against_reference(fn, q, k, v, cu_seqlens, causal, softmax_scale=None):
    """fn(q, k, v) -> (T, Hq, D): output and dQ, dK, dV against attention_reference."""
    check_op(fn, lambda q, k, v: attention_reference(q, k, v, cu_seqlens, causal, softmax_scale), [q, k, v],
             [True, True, True], *TOLERANCES[q.dtype])


DENSE_CASES = [
    # batch, seqlen, q heads, kv heads, head dim, dtype, causal
    (2, 1, 4, 1, 16, torch.bfloat16, True),
    (1, 17, 4, 4, 32, torch.float32, True),
    (2, 17, 8, 1, 16, torch.float16, False),
    (1, 127, 8, 2, 32, torch.bfloat16, True),
    (1, 129, 8, 1, 16, torch.bfloat16, False),
    (1, 129, 2, 2, 64, torch.float32, True),
    (1, 40, 2, 1, 128, torch.bfloat16, True),
    (2, 129, 8, 1, 128, torch.float16, True),
    (1, 33, 2, 1, 24, torch.float16, True),  # head dim not a power of two: padded tile, masked
]


@pytest.mark.parametrize("batch,seq,n_heads,n_kv_heads,head_dim,dtype,causal", DENSE_CASES)
def test_flash_attn_matches_float64(batch, seq, n_heads, n_kv_heads, head_dim, dtype, causal):
    q, k, v = (t.view(batch, seq, *t.shape[1:]) for t in _inputs(batch * seq, n_heads, n_kv_heads, head_dim, dtype))
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32)

    def run(q3, k3, v3):
        out = flash_attn(*(t.view(batch, seq, *t.shape[1:]) for t in (q3, k3, v3)), causal=causal)
        assert out.shape == (batch, seq, n_heads, head_dim)
        return out.reshape(batch * seq, n_heads, head_dim)

    _check_against_reference(run, *(t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v)), cu_seqlens, causal)


VARLEN_CASES = [
    # document lengths, q heads, kv heads, head dim, dtype, causal
    ([1, 17, 40, 1, 3], 4, 1, 32, torch.bfloat16, True),
    ([129, 1, 64], 4, 2, 16, torch.float32, True),
    ([5, 0, 33, 1], 2, 2, 16, torch.float16, False),  # an empty document in the middle
    ([1, 1, 1], 8, 1, 16, torch.bfloat16, True),
    ([70, 58], 8, 1, 16, torch.float16, True),
    ([3, 100, 1, 27], 4, 1, 32, torch.bfloat16, False),
]


@pytest.mark.parametrize("lengths,n_heads,n_kv_heads,head_dim,dtype,causal", VARLEN_CASES)
def test_flash_attn_varlen_matches_float64(lengths, n_heads, n_kv_heads, head_dim, dtype, causal):
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _inputs(sum(lengths), n_heads, n_kv_heads, head_dim, dtype)
    _check_against_reference(lambda *t: flash_attn_varlen(*t, cu_seqlens, max(lengths), causal=causal),
                             q, k, v, cu_seqlens, causal)


def test_varlen_as_the_model_calls_it():
    """Two rows of 48 tokens, each packing several documents; cu_seqlens over the flattened rows includes every
    row start, and max_seqlen is the row length (an upper bound on any document)."""
    batch, seq, n_heads, n_kv_heads, head_dim = 2, 48, 4, 1, 16
    cu_seqlens = torch.tensor([0, 10, 40, 48, 49, 96], dtype=torch.int32)
    q, k, v = _inputs(batch * seq, n_heads, n_kv_heads, head_dim, torch.bfloat16)

    def run(q3, k3, v3):
        q4, k4, v4 = (t.view(batch, seq, *t.shape[1:]) for t in (q3, k3, v3))
        out = flash_attn_varlen(q4.reshape(-1, n_heads, head_dim), k4.reshape(-1, n_kv_heads, head_dim),
                                v4.reshape(-1, n_kv_heads, head_dim), cu_seqlens, seq)
        return out.view(batch, seq, n_heads, head_dim).reshape(-1, n_heads, head_dim)

    _check_against_reference(run, q, k, v, cu_seqlens, causal=True)


def test_strided_inputs_and_custom_scale():
    """q, k, v as views into one packed qkv projection (token stride 3*H*D), a softmax scale of 0.3."""
    lengths, n_heads, head_dim = [23, 9], 2, 16
    cu_seqlens = torch.tensor([0, 23, 32], dtype=torch.int32)
    qkv = torch.randn(32, 3, n_heads, head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert q.stride(0) == 3 * n_heads * head_dim
    _check_against_reference(lambda *t: flash_attn_varlen(*t, cu_seqlens, 23, causal=True, softmax_scale=0.3),
                             q, k, v, cu_seqlens, True, softmax_scale=0.3)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_fallback_matches_float64(causal):
    lengths = [1, 20, 7]
    cu_seqlens = torch.tensor([0, 1, 21, 28], dtype=torch.int32)
    q, k, v = _inputs(28, 4, 1, 16, torch.float32)
    with force_implementation("torch"):
        _check_against_reference(lambda *t: flash_attn_varlen(*t, cu_seqlens, max(lengths), causal=causal),
                                 q, k, v, cu_seqlens, causal)
        dense = flash_attn(q[:20].view(2, 10, 4, 16), k[:20].view(2, 10, 1, 16), v[:20].view(2, 10, 1, 16),
                           causal=causal)
    cu_dense = torch.tensor([0, 10, 20], dtype=torch.int32)
    want = attention_reference(q[:20].double(), k[:20].double(), v[:20].double(), cu_dense, causal)
    assert_close("dense fallback", dense.reshape(20, 4, 16), want, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("bad,message", [
    (dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), "multiple of key/value heads"),
    (dict(v=torch.randn(10, 2, 8)), "k and v must both be"),
    (dict(q=torch.randn(10, 4, 16, dtype=torch.float16)), "share one dtype"),
    (dict(cu_seqlens=torch.tensor([0, 10])), "int32"),
    (dict(max_seqlen=0), "max_seqlen"),
])
def test_bad_inputs_are_named(bad, message):
    args = dict(q=torch.randn(10, 4, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                cu_seqlens=torch.tensor([0, 10], dtype=torch.int32), max_seqlen=10)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        flash_attn_varlen(**args)
