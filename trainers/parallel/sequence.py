"""Sequence parallelism over the mesh's `sp` axis, Ulysses style (DeepSpeed-Ulysses, Jacobs et al. 2023).

Each of the sp ranks of a data-parallel group reads the same rows and keeps one contiguous 1/sp of every
row's tokens (`shard_sequence`): embeddings, norms, MLPs and the loss only ever see that slice. Attention
needs the whole sequence, so around it an all-to-all trades the sequence split for a head split: q, k, v go
from (B, S/sp, H, D) to (B, S, H/sp, D), every rank attends over full rows for its heads (packed documents
masked by the batch's global `cu_seqlens`, exactly as without sp), and a second all-to-all brings the
output back to (B, S/sp, H, D). Parameters are replicated across sp, and each rank's gradient covers only
its tokens, so FSDP reduces gradients over dp_shard x sp (trainers.parallel.fsdp).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from trainers.attention import AttentionFn
from trainers.data import Batch


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 in equal parts: part j goes to rank j, part j of the result came from
    rank j. Its own adjoint: the gradient of the part sent to rank j is the gradient rank j holds for it."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a permuted input's strides
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(B, S/P, H, D), this rank's tokens of every head -> (B, S, H/P, D), every token of this rank's heads."""
    p = dist.get_world_size(group)
    b, s, h, d = x.shape
    parts = x.view(b, s, p, h // p, d).permute(2, 0, 1, 3, 4)  # part j: head group j, for rank j
    gathered = _AllToAll.apply(parts, group)  # part j: sequence chunk j (from rank j), this rank's heads
    return gathered.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def heads_to_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The inverse: (B, S, H/P, D) -> (B, S/P, H, D)."""
    p = dist.get_world_size(group)
    b, full, h, d = x.shape
    parts = x.view(b, p, full // p, h, d).permute(1, 0, 2, 3, 4)  # part j: sequence chunk j, for rank j
    gathered = _AllToAll.apply(parts, group)  # part j: head group j (from rank j), this rank's tokens
    return gathered.permute(1, 2, 0, 3, 4).reshape(b, full // p, p * h, d)


def ulysses(inner: AttentionFn, group: dist.ProcessGroup, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """`inner` over the whole sequences of sequence-sharded q, k, v, for 1/P of the heads, P = group size."""
    p = dist.get_world_size(group)
    if k.shape[2] % p:
        # Fewer kv heads than ranks (or not a multiple): give every query head its own copy, so each rank
        # gets the kv heads its query heads use.
        repeat = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    out = inner(*(sequence_to_heads(t, group) for t in (q, k, v)), **kwargs)
    return heads_to_sequence(out, group)


def ulysses_attention(inner: AttentionFn, group: dist.ProcessGroup) -> AttentionFn:
    """An attention function over sequence-sharded q, k, v that runs `inner` on full rows, 1/P of the heads."""

    @functools.wraps(inner)
    def attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        return ulysses(inner, group, q, k, v, **kwargs)

    return attention


def shard_sequence(batch: Batch, rank: int, size: int) -> Batch:
    """Rank `rank`'s contiguous 1/size of every row. `cu_seqlens` keeps describing the whole rows: attention
    runs on whole rows (after the all-to-all), the rest only needs the slice."""
    s = batch.tokens.shape[1] // size
    cut = slice(rank * s, (rank + 1) * s)
    return Batch(batch.tokens[:, cut], batch.targets[:, cut], batch.positions[:, cut], batch.cu_seqlens, batch.max_seqlen)
