"""Fully sharded data parallelism (FSDP2 `fully_shard`), with replication across dp_replicate (HSDP)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from trainers.model import Transformer


def _shard_axis(mesh: DeviceMesh) -> str:
    """The axis FSDP shards over: dp_shard, or dp_shard x sp flattened when sequence parallelism is on (sp
    ranks hold the same parameters but compute gradients on different tokens, which must be summed)."""
    if mesh["sp"].size() == 1:
        return "dp_shard"
    mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
    return "dp_shard_sp"


def apply_fsdp(model: Transformer, mesh: DeviceMesh, compute_dtype: torch.dtype) -> Transformer:
    """Shard each block, then the root (embeddings, final norm, output), over the dp axes of `mesh` (and sp).

    Per-block units let FSDP free a block's gathered weights as soon as its forward or backward is done.
    Gradients are reduced in float32 whatever the compute dtype, so a bf16 run's update matches fp32
    accumulation.
    """
    dp_mesh = mesh["dp_replicate", _shard_axis(mesh)]
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model
