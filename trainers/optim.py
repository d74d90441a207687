"""The optimizer: AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch

from trainers.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Matrices (linear and embedding weights) decay; vectors (norm gains) don't: decaying a gain pulls
    it towards 0 rather than towards its initial 1, which only hurts."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
