"""The training loop: step, accumulate, clip, update, validate, report, checkpoint.

Loss normalisation: each optimizer step's loss is the sum of token losses over the whole global batch
divided by the global count of valid targets, whatever the layout. Each rank backpropagates
sum_local / count_global * dp_size, and the data-parallel gradient reduction averages over dp_size ranks,
so every layout computes the gradient of the same number as one process would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainers.checkpoint import TrainState, load_checkpoint, save_checkpoint
from trainers.config import TrainerConfig
from trainers.data import Batch, BatchPlan, PackedRows, validation_rows
from trainers.metrics import StepMetrics
from trainers.reporter import Reporter, staging_dir
from trainers.schedules import lr_at


@dataclass
class Trainee:
    """What the loop trains, built by trainers.run from the config."""

    cfg: TrainerConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_rows: PackedRows
    val_rows: PackedRows
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    autocast_dtype: torch.dtype | None = None
    """Lower-precision compute for an unsharded model (FSDP's mixed-precision policy covers sharded ones)."""


def _dp_sum(x: torch.Tensor, dp_size: int) -> torch.Tensor:
    """Sum over data-parallel ranks. Ranks that differ only in their tp (or sp, pp) coordinate hold the
    same rows and so the same counts and loss sums: the world sum counts each dp rank world/dp times."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
        x *= dp_size / dist.get_world_size()
    return x


def _token_loss_sum(t: Trainee, batch: Batch) -> torch.Tensor:
    with torch.autocast(t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None):
        logits = t.model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100, reduction="sum")


def _set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    # FSDP2 modules defer the reduce-scatter while accumulating; a plain module has nothing to defer.
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def validate(t: Trainee) -> float:
    t.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=t.device)
    for rows in validation_rows(len(t.val_rows), t.cfg.train.micro_batch_size, t.cfg.train.val_batches, t.dp_rank, t.dp_size):
        batch = t.val_rows.batch(rows).to(t.device)
        total[0] += _token_loss_sum(t, batch).double()
        total[1] += batch.num_targets
    t.model.train()
    total = _dp_sum(total, t.dp_size)
    return float(total[0] / total[1])


def train_step(t: Trainee, plan: BatchPlan, step: int) -> tuple[float, float, int]:
    """One optimizer step; returns (loss, grad norm, tokens in the global batch)."""
    accum = t.cfg.train.grad_accum
    batches = [t.train_rows.batch(plan.rows(step, micro)) for micro in range(accum)]
    local = [sum(b.num_targets for b in batches), sum(b.tokens.numel() for b in batches)]
    counts = _dp_sum(torch.tensor(local, dtype=torch.float64, device=t.device), t.dp_size)
    n_targets, n_tokens = counts[0], int(counts[1])
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.device)
    for micro, batch in enumerate(batches):
        _set_gradient_sync(t.model, micro == accum - 1)
        token_loss = _token_loss_sum(t, batch.to(t.device))
        (token_loss * (t.dp_size / n_targets)).backward()
        loss_sum += token_loss.detach().double()
    max_norm = t.cfg.train.grad_clip or math.inf  # 0 disables clipping; the norm is still measured
    grad_norm = _local(torch.nn.utils.clip_grad_norm_(t.model.parameters(), max_norm))
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    loss = _dp_sum(loss_sum, t.dp_size) / n_targets
    return float(loss), float(grad_norm), n_tokens


def train(t: Trainee, reporter: Reporter) -> TrainState:
    cfg = t.cfg
    state = TrainState()
    with reporter.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            state = load_checkpoint(Path(checkpoint), t.model, t.optimizer)
    plan = BatchPlan(len(t.train_rows), cfg.train.micro_batch_size, cfg.train.grad_accum, t.dp_rank, t.dp_size, cfg.train.seed)
    meter = StepMetrics(cfg, t.device)
    if state.step == 0 and cfg.train.val_every:
        reporter.report([{"step": 0, "val_loss": validate(t)}])
    unreported: list[dict] = []

    for step in range(state.step, cfg.train.steps):
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        loss, grad_norm, n_tokens = train_step(t, plan, step)
        state = TrainState(step=step + 1, tokens_seen=state.tokens_seen + n_tokens)

        done = state.step
        last = done == cfg.train.steps
        metrics = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen}
        metrics |= meter.throughput(n_tokens, time.perf_counter() - started)
        if cfg.train.val_every and (done % cfg.train.val_every == 0 or last):
            metrics["val_loss"] = validate(t)
        unreported.append(metrics)
        if last or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            with staging_dir() as part:
                save_checkpoint(Path(part), t.model, t.optimizer, state)
                reporter.report(unreported, checkpoint_dir=Path(part))
            unreported = []
        elif done % cfg.train.log_every == 0 or "val_loss" in metrics:
            reporter.report(unreported)
            unreported = []
    return state
