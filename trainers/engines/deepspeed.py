"""The `deepspeed` engine: DeepSpeed's ZeRO (stage 1, 2 or 3) over the data-parallel ranks, and its AutoTP
tensor parallelism (parallel.tp) inside them.

DeepSpeed wraps our model and our optimizer (torch AdamW as its client optimizer, so nothing is compiled:
FusedAdam and the CPU Adam are C++/CUDA ops JIT-built on first use). It owns the gradient reduction and
partitioning, bf16, clipping and its checkpoint files; the loop still owns the batches, the loss
normalisation and the learning rate (set each step in optimizer.param_groups, which ZeRO steps with).

Gradient accumulation: `managed_gradient_accumulation=False` makes every `engine.step()` the accumulation
boundary, so DeepSpeed neither counts micro-steps nor divides the loss by gradient_accumulation_steps;
the loop's loss is already normalised by the global target count, as for FSDP, and the same arithmetic
gives the same gradients as one process.

Tensor parallelism (AutoTP training, `tensor_parallel.autotp_size`): DeepSpeed replaces each matrix of
AUTOTP_LAYERS with a column- or row-parallel layer holding this rank's slice, whose collectives run on a
(data_parallel, tensor_parallel) mesh it builds itself (deepspeed.utils.groups, tp innermost: the same groups as
our mesh's tp axis, so its data-parallel group is our dp x sp token group). ZeRO then partitions each tp rank's
slices over that data-parallel group. The loop gives the tp ranks the same rows, which DeepSpeed checks at the
first forward. A checkpoint holds one ZeRO checkpoint per tp rank (mp_rank_<t>); trainers.export joins them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainers.checkpoint import CheckpointError, TrainState, read_rank_state, verify_checkpoint, write_checkpoint
from trainers.config import TrainerConfig
from trainers.model import blocks

FLAT = "."
"""DeepSpeed writes a checkpoint under save_dir/tag/; tag '.' keeps its files flat in this rank's directory,
which is what the reporter merges (Ray Train and LocalReporter both merge flat per-rank directories)."""


AUTOTP_LAYERS = [
    # Megatron's split of each block (trainers.model's names): column-parallel wq/wk/wv and w1/w3, whose output
    # columns are whole heads (n_heads / tp query heads, n_kv_heads / tp key/value heads; trainers.config checks
    # that tp divides both) or a slice of the MLP hidden size; row-parallel wo and w2, whose partial outputs
    # DeepSpeed all-reduces. The embedding, the norms and the output projection match no pattern: replicated.
    {"patterns": [r".*\.attention\.w[qkv]\.weight$", r".*\.feed_forward\.w[13]\.weight$"], "partition_type": "column"},
    {"patterns": [r".*\.attention\.wo\.weight$", r".*\.feed_forward\.w2\.weight$"], "partition_type": "row"},
]
"""AutoTP's partition_config layer specs for our Transformer: its heuristic parser looks for HuggingFace names
(q_proj, o_proj, down_proj, ...), and a partition_config replaces it with these patterns alone."""


def autotp_split_dim(name: str) -> int | None:
    """The dimension AUTOTP_LAYERS splits parameter `name` along over the tensor-parallel ranks: 0 (column-parallel,
    a (out, in) weight's rows), 1 (row-parallel, its columns), or None (replicated)."""
    for spec in AUTOTP_LAYERS:
        if any(re.match(pattern, name) for pattern in spec["patterns"]):
            return 0 if spec["partition_type"] == "column" else 1
    return None


def join_tp_slices(slices: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors from each tensor-parallel rank's tensors (in tp rank order, under the same names): the split
    ones concatenated along autotp_split_dim (AutoTP gives rank r the r-th of its contiguous slices), the
    replicated ones rank 0's, which every rank holds alike."""
    return {name: tensor if (dim := autotp_split_dim(name)) is None else torch.cat([part[name] for part in slices], dim)
            for name, tensor in slices[0].items()}


def tp_ranks(checkpoint: Path) -> list[str]:
    """The tensor-parallel ranks ("00", "01", ...) a DeepSpeed checkpoint holds files of: its mp_rank_<t> (one,
    "00", without AutoTP)."""
    files = Path(checkpoint).glob("*_optim_states.pt")
    return sorted({m.group(1) for f in files if (m := re.search(r"mp_rank_(\d+)_", f.name))}, key=int)


def deepspeed_config(cfg: TrainerConfig) -> dict[str, Any]:
    """DeepSpeed's config for a trainer config (pure)."""
    tp = cfg.parallel.tp
    tensor_parallel = {"tensor_parallel": {"autotp_size": tp, "partition_config": {
        "use_default_specs": False, "strict_mode": False, "layer_specs": AUTOTP_LAYERS}}} if tp > 1 else {}
    return tensor_parallel | {
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
    tp: int = 1
    """AutoTP's degree (parallel.tp): a checkpoint holds one ZeRO checkpoint per tensor-parallel rank."""

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
        mp_rank_<t>_model_states.pt (ZeRO-1/2, dp rank 0 of each tp rank t) or
        zero_pp_rank_<d>_mp_rank_<t>_model_states.pt (ZeRO-3, every rank), and every rank's optimizer partition
        zero_pp_rank_<d>_mp_rank_<t>_optim_states.pt; d is the dp rank, t the tp rank (00 without AutoTP)."""
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
        # the same world split otherwise (dp x tp) would load tensor-parallel slices into whole weights, or back
        if (saved_tp := len(tp_ranks(path))) != self.tp:
            raise CheckpointError(f"{path} was written with parallel.tp = {saved_tp} (it holds the files of {saved_tp} "
                                  f"tensor-parallel ranks, mp_rank_*), this run has parallel.tp = {self.tp}: a "
                                  "parallel.engine=deepspeed checkpoint resumes only with the parallel.tp that wrote it")
        self.ds_engine.load_checkpoint(str(path), tag=FLAT, load_lr_scheduler_states=False)
        return read_rank_state(path)


def build_deepspeed(cfg: TrainerConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, use_gpu: bool) -> DeepSpeedEngine:
    """Wrap a materialised, initialised model. Every rank holds the whole model until AutoTP slices it and ZeRO-3
    partitions it here (deepspeed.zero.Init would avoid that, but init_weights fills whole, unsharded parameters)."""
    # Chosen once per process on the first import; without it a GPU host running CPU workers picks cuda.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed

    # DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce (C++, ninja) on CPU hosts, used only
    # by inference_all_reduce; marking it unbuildable keeps training on plain torch.distributed (gloo).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    if cfg.parallel.tp > 1:
        # AutoTP sliced the weights in place (the parameters, and so the client optimizer's, are the same
        # objects); the attention views its projections as (B, S, heads, head_dim) and must count the heads
        # this rank now holds. DeepSpeed divides attributes it knows by name (n_heads, not n_kv_heads): set both.
        for block in blocks(model):
            block.attention.n_heads = cfg.model.n_heads // cfg.parallel.tp
            block.attention.n_kv_heads = cfg.model.kv_heads // cfg.parallel.tp
    return DeepSpeedEngine(ds_engine, optimizer, cfg.parallel.tp)
