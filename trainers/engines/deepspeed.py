"""The `deepspeed` engine: DeepSpeed's ZeRO (stage 1, 2 or 3) over the data-parallel ranks.

DeepSpeed wraps our model and our optimizer (torch AdamW as its client optimizer, so nothing is compiled:
FusedAdam and the CPU Adam are C++/CUDA ops JIT-built on first use). It owns the gradient reduction and
partitioning, bf16, clipping and its checkpoint files; the loop still owns the batches, the loss
normalisation and the learning rate (set each step in optimizer.param_groups, which ZeRO steps with).

Gradient accumulation: `managed_gradient_accumulation=False` makes every `engine.step()` the accumulation
boundary, so DeepSpeed neither counts micro-steps nor divides the loss by gradient_accumulation_steps;
the loop's loss is already normalised by the global target count, as for FSDP, and the same arithmetic
gives the same gradients as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainers.checkpoint import CheckpointError, TrainState, read_rank_state, verify_checkpoint, write_checkpoint
from trainers.config import TrainerConfig

FLAT = "."
"""DeepSpeed writes a checkpoint under save_dir/tag/; tag '.' keeps its files flat in this rank's directory,
which is what the reporter merges (Ray Train and LocalReporter both merge flat per-rank directories)."""


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """DeepSpeed's config for a trainer config (pure)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.train.grad_clip,  # 0 disables it, as train.grad_clip=0 does
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # bf16 keeps fp32 master weights in the optimizer; reduce in fp32 as the fsdp engine does.
        "bf16": {"enabled": cfg.train.dtype == "bfloat16"},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,  # torch AdamW: ZeRO steps it on its flat fp32 partitions
        "steps_per_print": 2**62,  # we report metrics ourselves
    }


@dataclass
class DeepSpeedEngine:
    ds_engine: Any
    """deepspeed.DeepSpeedEngine, itself an nn.Module whose forward runs ours (with ZeRO-3's gathers)."""
    optimizer: torch.optim.Optimizer
    """The client AdamW."""

    @property
    def model(self) -> torch.nn.Module:
        return self.ds_engine

    def set_gradient_sync(self, enabled: bool) -> None:
        pass  # step() is the accumulation boundary (managed_gradient_accumulation=False)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds_engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.ds_engine.step()
        return float(self.ds_engine.get_global_grad_norm())

    def save(self, path: Path, state: TrainState) -> None:
        """The files trainers.checkpoint describes, with DeepSpeed's in place of the DCP shards:
        mp_rank_00_model_states.pt (ZeRO-1/2, dp rank 0) or zero_pp_rank_<r>_mp_rank_00_model_states.pt
        (ZeRO-3, every rank), and every rank's optimizer partition zero_pp_rank_<r>_mp_rank_00_optim_states.pt."""
        write_checkpoint(path, state, lambda: self.ds_engine.save_checkpoint(str(path), tag=FLAT, save_latest=False))

    def load(self, path: Path) -> TrainState:
        path = Path(path)
        verify_checkpoint(path)
        # DeepSpeed would quietly start from the current weights if its files were missing or partitioned
        # differently; ZeRO checkpoints (unlike the fsdp engine's DCP ones) load on the same world only.
        parts, world = len(list(path.glob("zero_pp_rank_*_optim_states.pt"))), dist.get_world_size()
        if parts != world:
            raise CheckpointError(f"{path} holds {parts} ZeRO optimizer partitions, this run has {world} ranks: a "
                                  "parallel.engine=deepspeed checkpoint resumes only with the engine and world that wrote it")
        self.ds_engine.load_checkpoint(str(path), tag=FLAT, load_lr_scheduler_states=False)
        return read_rank_state(path)


def build_deepspeed(cfg: TrainerConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, use_gpu: bool) -> DeepSpeedEngine:
    """Wrap a materialised, initialised model. Every rank holds the whole model until ZeRO-3 partitions it
    here (deepspeed.zero.Init would avoid that, but init_weights fills whole, unsharded parameters)."""
    # Chosen once per process on the first import; without it a GPU host running CPU workers picks cuda.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed

    # DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce (C++, ninja) on CPU hosts, used only
    # by inference_all_reduce; marking it unbuildable keeps training on plain torch.distributed (gloo).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return DeepSpeedEngine(ds_engine, optimizer)
