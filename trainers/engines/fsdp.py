"""The `fsdp` engine: plain autograd and a torch optimizer over a model that trainers.parallel has already
parallelised (FSDP2, TP, or nothing for one process); checkpoints through DCP (trainers.checkpoint)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint


@dataclass
class FSDPEngine:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_clip: float
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still measured)."""
    pp_group: Any = None
    """Pipeline parallelism: each pp rank holds other parameters, so the norm is summed over this group."""

    def set_gradient_sync(self, enabled: bool) -> None:
        # FSDP2 modules defer the reduce-scatter while accumulating; a plain module has nothing to defer.
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        if self.pp_group is not None:
            return self._pipeline_step()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)

    def _pipeline_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        squared = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).double() ** 2
        dist.all_reduce(squared, group=self.pp_group)
        total = squared.sqrt()
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, total.float())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def save(self, path: Path, state: TrainState) -> None:
        save_checkpoint(path, self.model, self.optimizer, state)

    def load(self, path: Path) -> TrainState:
        return load_checkpoint(path, self.model, self.optimizer)
