"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with sequence-parallel norms (Korthikanti et al. 2022),
through DTensor's `parallelize_module`, following torchtitan's Llama plan.

The residual stream and the RMSNorms run sequence-sharded, (B, S/tp, dim) on each rank. Each attention and
MLP input is all-gathered to the full sequence and goes through column-parallel wq/wk/wv (w1/w3), whose
local outputs are whole heads (a slice of the hidden columns), then a row-parallel wo (w2), whose partial
sums are reduce-scattered back onto sequence shards. Per block: an all-gather and a reduce-scatter forward
for each of attention and MLP, and the reverse pair backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainers.model import Transformer, blocks

if TYPE_CHECKING:
    from trainers.parallel.pipeline import PipelineShard


def apply_tp(model: Transformer | PipelineShard, tp_mesh: DeviceMesh) -> Transformer | PipelineShard:
    """Shard `model`'s matrices over the 1-D `tp_mesh`; run before FSDP, which then shards the DTensors again.

    The embedding is row-parallel (each rank a slice of the vocabulary, outputs sequence-sharded), the output
    projection column-parallel with its logits gathered back to the full vocabulary on every rank, so the
    loss sees ordinary (B, S, vocab) logits. Both weights are (vocab, dim) sharded on dim 0, so tied
    embeddings stay one parameter. trainers.config checks what must divide by tp: n_heads and n_kv_heads
    (whole heads per rank), the MLP hidden size (w2's input shards must match w1's output shards) and the
    sequence length (equal sequence shards); the vocabulary may split unevenly.

    `model` may be a pipeline stage's shard (trainers.parallel.pipeline.PipelineShard): then only the parts it
    holds, `model.parts`, and its blocks are sharded; the residual stream it takes and gives is each rank's
    sequence shard, a plain (B, S/tp, dim) tensor.
    """
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    # one part at a time, by attribute: a plan keyed by name would miss a module the shard also holds under an
    # earlier name (a tied last stage's output projection is its tok_embeddings too)
    for name in getattr(model, "parts", tuple(plan)):
        parallelize_module(getattr(model, name), tp_mesh, plan[name])
    for block in blocks(model):
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # forward(x, cos, sin, cu_seqlens, max_seqlen): only x is sharded; the rotary tables and document
            # boundaries are ordinary tensors, the same on every rank
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
        # the attention views its projections as (B, S, heads, head_dim): from here on each rank holds
        # n_heads / tp query heads and n_kv_heads / tp key/value heads (torchtitan adjusts them the same way)
        block.attention.n_heads //= tp_mesh.size()
        block.attention.n_kv_heads //= tp_mesh.size()
    return model
