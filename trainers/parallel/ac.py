"""Activation checkpointing: trade compute for memory, one transformer block at a time.

Each block keeps only its input for the backward pass and runs its forward again there (torch's
non-reentrant checkpoint), so the activations held across the model shrink from every block's internals
to one (dim,) vector per token per block, plus the internals of the one block being recomputed; the cost
is about one more forward pass per step (a third more compute). Applied before FSDP wraps the blocks, as
the checkpointed region then sits inside each FSDP unit's gather and free.
"""

from __future__ import annotations

from torch import nn

from trainers.model import blocks


def apply_ac(model: nn.Module) -> nn.Module:
    """Checkpoint every transformer block of `model` (a whole Transformer or a pipeline stage's shard)."""
    for block in blocks(model):
        block.recompute = True
    return model
