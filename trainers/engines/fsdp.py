"""The `fsdp` engine: plain autograd and a torch optimizer over a model that trainers.parallel has already
parallelised (FSDP2, TP, or nothing for one process); checkpoints through DCP (trainers.checkpoint)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint


@dataclass
class FSDPEngine:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    grad_clip: float
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still measured)."""

    def set_gradient_sync(self, enabled: bool) -> None:
        # FSDP2 modules defer the reduce-scatter while accumulating; a plain module has nothing to defer.
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)

    def save(self, path: Path, state: TrainState) -> None:
        save_checkpoint(path, self.model, self.optimizer, state)

    def load(self, path: Path) -> TrainState:
        return load_checkpoint(path, self.model, self.optimizer)
