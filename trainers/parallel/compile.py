"""torch.compile, one transformer block at a time.

Compiling each block rather than the whole model keeps the graphs small (one compile serves every block of
the same shape), leaves the FSDP units' gather and free outside the graphs, and lets a pipeline stage
compile only the blocks it holds. Applied after tensor parallelism (the graphs then see the DTensor
layouts) and before FSDP, the order torch's FSDP2 documents. Packed batches change the number of documents
from step to step: dynamo marks those sizes dynamic after the first recompile.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.model import blocks


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile the body of every transformer block of `model` in place (parameter names are unchanged).

    The body, not the block: activation checkpointing then wraps compiled code rather than being traced
    into the graph, which DTensor-sharded blocks (tensor parallelism) cannot do in torch 2.13 (the
    checkpoint would save the DeviceMesh as a tensor)."""
    for block in blocks(model):
        block._block = torch.compile(block._block)
    return model
