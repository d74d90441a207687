"""The `fsdp` engine: plain autograd and a torch optimizer over a model that trainers.parallel has already
parallelised (FSDP2, TP, or nothing for one process); checkpoints through DCP (trainers.checkpoint).

Clipping: the engine measures the global gradient norm and clips the gradients before the optimizer steps,
unless the optimizer is a FusedAdamW built with max_grad_norm (trainers.optim.build_optimizer): that one
measures the same norm and applies the clip inside its step (kernels/adamw.py), so the engine only reports
the norm it measured. Pipeline stages hold parameters outside FusedAdamW's mesh, so they keep the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kernels import FusedAdamW
from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint


@dataclass
class FSDPEngine:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_clip: float
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still measured)."""
    pp_group: Any = None
    """Pipeline parallelism: each pp rank holds other parameters, so the norm is summed over this group."""
    norm_skips: tuple[str, ...] = ()
    """Parameters (by name) clipped and stepped here but counted in the norm on another pp rank, which holds a
    copy: the last stage's copy of a tied embedding (trainers.parallel.pipeline)."""

    def __post_init__(self) -> None:
        if self.optimizer_clips and (self.optimizer.max_grad_norm != self.grad_clip or self.pp_group is not None):
            raise ValueError(f"FSDPEngine(grad_clip={self.grad_clip}{', pp_group=...' if self.pp_group else ''}): its "
                             f"optimizer clips at max_grad_norm={self.optimizer.max_grad_norm} inside its step; build "
                             "it with max_grad_norm = grad_clip, and without one on pipeline stages (their norm spans "
                             "the pp group, which FusedAdamW does not see)")

    @property
    def optimizer_clips(self) -> bool:
        """Whether the optimizer measures the norm and clips in its step (FusedAdamW with max_grad_norm)."""
        return isinstance(self.optimizer, FusedAdamW) and self.optimizer.max_grad_norm is not None

    def set_gradient_sync(self, enabled: bool) -> None:
        # FSDP2 modules defer the reduce-scatter while accumulating; a plain module has nothing to defer.
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    def set_replica_sync(self, enabled: bool) -> None:
        """HSDP (parallel.dp_replicate > 1): False keeps each backward's reduce-scattered gradients within the
        replica, summed, and leaves out the all-reduce across replicas until a backward with True. Replicas may
        then run different numbers of backward passes in a step (adaptive SP's domains)."""
        if hasattr(self.model, "set_requires_all_reduce"):
            self.model.set_requires_all_reduce(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        if self.optimizer_clips:
            self.optimizer.step()
            norm = self.optimizer.grad_norm
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        named = [(name, p) for name, p in self.model.named_parameters() if p.grad is not None]
        params = [p for _, p in named]
        norm = torch.nn.utils.get_total_norm([p.grad for name, p in named if name not in self.norm_skips])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor: over its mesh already
        if self.pp_group is not None:
            squared = norm.double() ** 2
            dist.all_reduce(squared, group=self.pp_group)
            norm = squared.sqrt().float()
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, path: Path, state: TrainState) -> None:
        save_checkpoint(path, self.model, self.optimizer, state)

    def load(self, path: Path) -> TrainState:
        return load_checkpoint(path, self.model, self.optimizer)
