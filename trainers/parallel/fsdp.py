"""Fully sharded data parallelism (FSDP2 `fully_shard`), with replication across dp_replicate (HSDP)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from trainers.model import Transformer


def _dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: dp_replicate x dp_shard, with sp folded into dp_shard when sequence
    parallelism is on (sp ranks hold the same parameters but compute gradients on different tokens, which
    must be summed)."""
    if mesh["sp"].size() == 1:
        return mesh["dp_replicate", "dp_shard"]
    flat = mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
    if mesh["dp_replicate"].size() == 1:
        return flat  # plain FSDP over dp_shard x sp
    # HSDP with sp: slicing a flattened axis from the root mesh warns of a future deprecation in torch, with
    # no replacement for a 2-D (replicate, flattened) mesh yet.
    return mesh["dp_replicate", "dp_shard_sp"]


def _sharding(mesh: DeviceMesh, compute_dtype: torch.dtype) -> dict:
    """fully_shard's mesh and mixed precision, the same for every unit of every layout."""
    return {"mesh": _dp_mesh(mesh), "mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}


def apply_fsdp(model: Transformer, mesh: DeviceMesh, compute_dtype: torch.dtype, cpu_offload: bool = False) -> Transformer:
    """Shard each block, then the root (embeddings, final norm, output), over the dp axes of `mesh` (and sp).

    Per-block units let FSDP free a block's gathered weights as soon as its forward or backward is done.
    Gradients are reduced in float32 whatever the compute dtype, so a bf16 run's update matches fp32
    accumulation. With `cpu_offload` the sharded parameters, their gradients and so the optimizer state live
    in (pinned, on a GPU) CPU memory: FSDP copies a unit to the device to gather it, and the optimizer steps
    on the CPU; the caller materialises the model on the CPU.
    """
    shard = _sharding(mesh, compute_dtype)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, **shard, offload_policy=offload)
    fully_shard(model, **shard, offload_policy=offload)
    return model


def apply_fsdp_to_stages(shard: torch.nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Pipeline stages (trainers.parallel.pipeline): the stage modules call the shard's parts directly, never
    the shard itself, so each part is its own FSDP unit (each block; the embedding, final norm and output
    projection where this rank holds them: `shard.parts`) rather than children of a root unit whose forward
    never runs. Stages with no other ranks of their tokens (no dp, no sp) are wrapped too, as a lone worker's
    model is: FSDP's mixed precision is what runs them in the compute dtype."""
    sharding = _sharding(mesh, compute_dtype)
    for name in shard.parts:
        fully_shard(getattr(shard, name), **sharding)
    for block in shard.layers.values():
        fully_shard(block, **sharding)
    return shard
