"""Ring attention over the mesh's `sp` axis (parallel.sp_mode = ring): the other sequence-parallel mode.

Like Ulysses (trainers.parallel.sequence), each of P sp ranks holds a contiguous 1/P of every row. Unlike it,
q never moves and every rank keeps all heads: the key/value chunks travel round the ring, and each rank folds
each visiting chunk into its queries' output with an online softmax (running max, sum and weighted values in
float32, as FlashAttention does within a device). No all-to-all, and no divisibility of heads by P; the price
is P steps of point-to-point traffic. Packed documents are masked by document id and global position, so a
chunk pair sees exactly the pairs (query, key) that one process would: same document, key not after query.
Chunks wholly after a rank's queries are skipped (causal).

Backward walks the ring again, recomputing each block's probabilities from the saved log-sum-exp; the key
and value gradients travel with their chunk and are home after P steps.

The blocks run as PyTorch matmuls (each holds a (B, H, S/P, S/P) score tile), not our Triton kernel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from trainers.attention import AttentionFn, document_ids


def _ring_pass(tensors: list[Tensor], group: dist.ProcessGroup) -> list[Tensor]:
    """Send each tensor to the next rank of the ring, receive the previous rank's."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    to, frm = dist.get_global_rank(group, (r + 1) % p), dist.get_global_rank(group, (r - 1) % p)
    tensors = [t.contiguous() for t in tensors]  # before empty_like, which keeps a transposed input's strides
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, buf, frm, group) for buf in received]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


def _block_mask(docs: Tensor, rank: int, chunk: int, s: int) -> Tensor:
    """(B, 1, s, s) bool: query i of this rank's chunk may attend key j of chunk `chunk`."""
    q_doc, k_doc = docs[:, rank * s:(rank + 1) * s], docs[:, chunk * s:(chunk + 1) * s]
    q_pos = torch.arange(rank * s, (rank + 1) * s, device=docs.device)
    k_pos = torch.arange(chunk * s, (chunk + 1) * s, device=docs.device)
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]
    return (same_doc & (k_pos[None, :] <= q_pos[:, None]))[:, None]


class _RingAttention(torch.autograd.Function):
    """q, k, v (B, H, s, D), this rank's chunk, as many kv heads as q heads; docs (B, P*s) document ids."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, docs: Tensor, scale: float, group: dist.ProcessGroup) -> Tensor:
        p, r, s = dist.get_world_size(group), dist.get_rank(group), q.shape[2]
        qf = q.float()
        m = torch.full(q.shape[:3], float("-inf"), device=q.device)
        denom = torch.zeros(q.shape[:3], device=q.device)
        acc = torch.zeros(q.shape, device=q.device)
        kv = [k, v]
        for t in range(p):
            chunk = (r - t) % p
            if chunk <= r:  # later chunks hold only future keys
                scores = (qf @ kv[0].float().transpose(-1, -2)) * scale
                scores = scores.masked_fill(~_block_mask(docs, r, chunk, s), float("-inf"))
                new_m = torch.maximum(m, scores.amax(-1))
                safe = torch.where(torch.isinf(new_m), torch.zeros_like(new_m), new_m)  # rows all masked so far
                alpha, probs = torch.exp(m - safe), torch.exp(scores - safe[..., None])
                denom = denom * alpha + probs.sum(-1)
                acc = acc * alpha[..., None] + probs @ kv[1].float()
                m = new_m
            if t < p - 1:
                kv = _ring_pass(kv, group)
        out = acc / denom[..., None]  # every query sees at least itself: denom > 0
        lse = m + torch.log(denom)
        ctx.save_for_backward(q, k, v, out, lse, docs)
        ctx.scale, ctx.group = scale, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, docs = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        p, r, s = dist.get_world_size(group), dist.get_rank(group), q.shape[2]
        qf, do = q.float(), grad_out.float()
        delta = (do * out).sum(-1, keepdim=True)  # rowsum(dO * O)
        dq = torch.zeros_like(qf)
        travelling = [k, v, torch.zeros(k.shape, device=k.device), torch.zeros(v.shape, device=v.device)]
        for t in range(p):
            chunk = (r - t) % p
            kc, vc, dk, dv = travelling
            if chunk <= r:
                scores = (qf @ kc.float().transpose(-1, -2)) * scale
                scores = scores.masked_fill(~_block_mask(docs, r, chunk, s), float("-inf"))
                probs = torch.exp(scores - lse[..., None])
                dv = dv + probs.transpose(-1, -2) @ do
                ds = probs * (do @ vc.float().transpose(-1, -2) - delta)
                dq += (ds @ kc.float()) * scale
                dk = dk + (ds.transpose(-1, -2) @ qf) * scale
            travelling = _ring_pass([kc, vc, dk, dv], group)  # after p passes each chunk is home
        dk, dv = travelling[2], travelling[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(group: dist.ProcessGroup) -> AttentionFn:
    """An attention function over sequence-sharded q (B, S/P, Hq, D) and k, v (B, S/P, Hkv, D)."""

    def attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                  dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
        if dropout_p > 0:
            raise ValueError(f"parallel.sp_mode = 'ring' has no attention dropout (model.dropout_attn = {dropout_p})")
        batch, s = q.shape[:2]
        repeat = q.shape[2] // k.shape[2]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        docs = document_ids(cu_seqlens, batch, s * dist.get_world_size(group), q.device)
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        out = _RingAttention.apply(*(t.transpose(1, 2) for t in (q, k, v)), docs, scale, group)
        return out.transpose(1, 2)

    return attention
