"""Attention functions the model can plug in. All take q (B, S, Hq, D), k/v (B, S, Hkv, D) and are causal.

With `cu_seqlens` (int32 (n_docs+1,) boundaries over the flattened B*S tokens, every row start included),
a token attends only to earlier tokens of its own document.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[..., Tensor]


def document_mask(cu_seqlens: Tensor, batch: int, seq: int) -> Tensor:
    """(B, 1, S, S) bool: True where query i may attend key j (same document, j <= i)."""
    token = torch.arange(batch * seq, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(torch.int64), token, right=True).view(batch, seq)
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (same_doc & causal)[:, None]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                   dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
    batch, seq = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) for SDPA
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves Hq/Hkv query heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=softmax_scale)
    else:
        mask = document_mask(cu_seqlens, batch, seq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2)


ATTENTION = {"sdpa": sdpa_attention, "auto": sdpa_attention}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION[name]
    except KeyError:
        raise ValueError(f"attention {name!r} is unknown; allowed: {', '.join(ATTENTION)}") from None
