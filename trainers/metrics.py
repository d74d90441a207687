"""Throughput metrics: tokens/s, model FLOPs utilisation (MFU) and memory."""

from __future__ import annotations

import psutil
import torch
import torch.distributed as dist

from trainers.config import TrainerConfig
from trainers.model import flops_per_token

# Dense bf16 peak FLOP/s by GPU name, from the vendors' data sheets (no sparsity). MFU is only reported
# where the peak is known or given as train.peak_flops: a made-up CPU peak would make the number lie.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(cfg: TrainerConfig, device: torch.device) -> float | None:
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class StepMetrics:
    def __init__(self, cfg: TrainerConfig, device: torch.device):
        self.device = device
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak = peak_flops(cfg, device)
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def throughput(self, tokens: int, seconds: float) -> dict[str, float]:
        """`tokens` is the global batch; MFU divides achieved FLOP/s by the peak of all devices."""
        tokens_per_s = tokens / seconds
        out = {"tokens_per_s": tokens_per_s, "step_time_s": seconds}
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world)
        if self.device.type == "cuda":
            out["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            out["memory_gb"] = psutil.Process().memory_info().rss / 2**30
        return out
