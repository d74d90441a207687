"""Attention functions the model plugs in, chosen by name with `get_attention` (config `model.attention`).

Every function takes q (B, S, Hq, D) and k, v (B, S, Hkv, D) with Hq % Hkv == 0, returns (B, S, Hq, D), and
is causal. With `cu_seqlens` (int32 (n_docs+1,) document boundaries over the flattened B*S tokens, from 0 to
B*S, every row start b*S among them) a token attends only to earlier tokens of its own document, so packed
documents never see each other. `max_seqlen` (the longest document) is for varlen kernels; SDPA ignores it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[..., Tensor]


def document_ids(cu_seqlens: Tensor | None, batch: int, seq: int, device: torch.device | str | None = None) -> Tensor:
    """(B, S) the document (segment) of every token; without cu_seqlens each row is one document."""
    token = torch.arange(batch * seq, device=cu_seqlens.device if cu_seqlens is not None else device)
    if cu_seqlens is None:
        return (token // seq).view(batch, seq)
    # how many boundaries (after the leading 0) are <= the token's flat index
    return torch.searchsorted(cu_seqlens[1:].long(), token, right=True).view(batch, seq)


def document_mask(cu_seqlens: Tensor, batch: int, seq: int) -> Tensor:
    """(B, 1, S, S) bool, True where query i may attend key j: same document and j <= i."""
    doc = document_ids(cu_seqlens, batch, seq)
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (same_doc & causal)[:, None]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                   dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
    """Causal attention with PyTorch SDPA; block-diagonal causal over documents when `cu_seqlens` is given.

    q: (B, S, Hq, D), k/v: (B, S, Hkv, D) -> (B, S, Hq, D). softmax_scale defaults to 1/sqrt(D).
    """
    batch, seq = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, S, D)
    if cu_seqlens is None:
        # enable_gqa lets each kv head serve Hq/Hkv query heads without copying it (flash kernel on CUDA)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=softmax_scale,
                                             enable_gqa=True)
    elif batch == 1:
        # One packed row (document batching, adaptive SP): each document on its own, so attention costs the
        # sum of their squared lengths, not the square of the row (what the adaptive SP cost model assumes)
        bounds = cu_seqlens.tolist()
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout_p,
                                                        is_causal=True, scale=softmax_scale, enable_gqa=True)
                         for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=2)
    else:
        # With a mask, CUDA's only fused kernel is the memory-efficient one, which has no GQA: enable_gqa would
        # fall back to the math kernel and hold every (S, S) score matrix. Repeating kv heads keeps the fused
        # kernel (transformers' `use_gqa_in_sdpa` makes the same call).
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        mask = document_mask(cu_seqlens, batch, seq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                     max_seqlen: int | None = None, dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
    """Our Triton flash attention (kernels.flash_attn_varlen) on the B*S tokens laid end to end: cu_seqlens
    already lists every row start, so packed documents and rows are the kernel's documents as they are.
    The kernel has no attention dropout."""
    from kernels import flash_attn, flash_attn_varlen

    if dropout_p > 0:
        raise ValueError(f"model.attention = 'triton' has no attention dropout (model.dropout_attn = {dropout_p}); "
                         "set model.dropout_attn = 0, or use model.attention = 'sdpa'")
    if cu_seqlens is None:
        return flash_attn(q, k, v, causal=True, softmax_scale=softmax_scale)
    batch, seq = q.shape[:2]
    packed = (t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v))
    out = flash_attn_varlen(*packed, cu_seqlens, max_seqlen or seq, causal=True, softmax_scale=softmax_scale)
    return out.view(q.shape)


def auto_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Triton flash attention for CUDA tensors where the kernels layer runs it there (verified on this GPU,
    kernels/verified.py, or FLOTILLA_KERNELS=triton) and without attention dropout, which it lacks; SDPA
    otherwise: on the CPU even an available Triton interpreter is far slower than SDPA."""
    if q.is_cuda and not kwargs.get("dropout_p") and attention_choice("auto", q.device)[0] == "triton":
        return triton_attention(q, k, v, **kwargs)
    return sdpa_attention(q, k, v, **kwargs)


def attention_choice(name: str, device: torch.device | str,
                     capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """(what `model.attention = name` runs for tensors on `device` without attention dropout, why): 'triton',
    'sdpa', or for 'triton' where the kernel falls back, 'torch fallback (per-document SDPA)'. capability: the
    CUDA compute capability it is for (None: this process's GPU; see kernels.choose)."""
    from kernels import choose

    if name == "sdpa":
        return "sdpa", "model.attention = sdpa"
    kernel, why = choose("flash_attn", device, capability)
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "sdpa", (f"model.attention = auto on {torch.device(device).type}: SDPA (off CUDA, Triton runs "
                            "only interpreted, far slower)")
        return ("triton" if kernel == "triton" else "sdpa"), why
    return ("triton" if kernel == "triton" else "torch fallback (per-document SDPA)"), why


ATTENTION: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "auto": auto_attention, "triton": triton_attention}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION[name]
    except KeyError:
        raise ValueError(f"model.attention={name!r} is unknown; allowed: {', '.join(sorted(ATTENTION))}") from None
