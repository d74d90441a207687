"""The optimizer: AdamW with weight decay on matrices only; torch's, or our FusedAdamW (kernels/adamw.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from trainers.config import OptimConfig

MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OptimizerChoice:
    """Which optimizer steps the parameters, where its update runs, and why."""

    fused: bool
    """kernels.FusedAdamW; else torch.optim.AdamW."""
    implementation: str
    """'triton' (FusedAdamW's kernel) or 'torch' (PyTorch code: torch's AdamW, or FusedAdamW's own fallback)."""
    reason: str

    def describe(self) -> str:
        if not self.fused:
            name = "torch AdamW"
        else:
            name = "FusedAdamW (Triton)" if self.implementation == "triton" else "FusedAdamW (its PyTorch code)"
        return f"{name}: {self.reason}"


def choose_optimizer(cfg: OptimConfig, device: torch.device | str, engine: str = "fsdp",
                     capability: tuple[int, int] | None = None) -> OptimizerChoice:
    """The optimizer for parameters on `device` under `cfg` and parallel.engine = `engine`. capability: the
    CUDA compute capability it is for (None: this process's GPU, unknown without one; see kernels.choose)."""
    kernel, why = kernels.choose("fused_adamw", device, capability)
    if cfg.moments_dtype == "bfloat16":  # only FusedAdamW keeps bf16 moments (the config refuses 'torch' with them)
        return OptimizerChoice(True, kernel, f"optim.moments_dtype = bfloat16 is FusedAdamW's; its update: {why}")
    if cfg.implementation == "torch":
        return OptimizerChoice(False, "torch", "optim.implementation = torch")
    if cfg.implementation == "triton":
        return OptimizerChoice(True, kernel, f"optim.implementation = triton; its update: {why}")
    if engine != "fsdp":
        return OptimizerChoice(False, "torch", f"optim.implementation = auto under parallel.engine = {engine}")
    if torch.device(device).type != "cuda":
        return OptimizerChoice(False, "torch", f"optim.implementation = auto on {torch.device(device).type}")
    return OptimizerChoice(kernel == "triton", kernel, why)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, engine: str = "fsdp",
                    max_grad_norm: float | None = None) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters as choose_optimizer picks it.

    max_grad_norm: where the global gradient norm is what FusedAdamW can measure (the fsdp engine without
    pipeline stages), the clipping threshold it folds into its step (None: the engine clips, or nobody); a
    torch AdamW ignores it and leaves clipping to the engine. Check `FusedAdamW.max_grad_norm` for which it is.

    Matrices (linear and embedding weights) decay; vectors (norm gains) don't: decaying a gain pulls it
    towards 0 rather than towards its initial 1, which only hurts.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    if choose_optimizer(cfg, device, engine).fused:
        # The state's keys are AdamW's, so float32-moment checkpoints move between the two optimizers.
        return kernels.FusedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, max_grad_norm=max_grad_norm,
                                  moments_dtype=MOMENT_DTYPES[cfg.moments_dtype])
    # On CUDA, torch's fused AdamW: one kernel per step, 13.1 ms against foreach's 36.8 ms for 1.23B float32
    # parameters on an H100 (DESIGN.md section 9). DeepSpeed steps it on its own flat partitions, left as before.
    fused = device.type == "cuda" and engine == "fsdp"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
