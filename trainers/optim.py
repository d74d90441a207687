"""The optimizer: AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch

import kernels
from trainers.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, engine: str = "fsdp") -> torch.optim.Optimizer:
    """Matrices (linear and embedding weights) decay; vectors (norm gains) don't: decaying a gain pulls
    it towards 0 rather than towards its initial 1, which only hurts."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer_implementation(cfg, next(model.parameters()).device, engine) == "triton":
        # Clipping stays with the engine (it reports the norm); the state's keys are AdamW's, so checkpoints
        # move between the two optimizers.
        return kernels.FusedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def optimizer_implementation(cfg: OptimConfig, device: torch.device | str, engine: str = "fsdp") -> str:
    """'triton' (FusedAdamW) or 'torch' (torch.optim.AdamW) for parameters on `device`."""
    if cfg.implementation == "torch":
        return "torch"
    if cfg.implementation == "auto" and (torch.device(device).type != "cuda" or engine != "fsdp"):
        return "torch"
    return kernels.implementation("fused_adamw", device)
