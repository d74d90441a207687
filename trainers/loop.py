"""The training loop: step, accumulate, clip, update, validate, report, checkpoint.

Loss normalisation: each optimizer step's loss is the sum of token losses over the whole global batch
divided by the global count of valid targets, whatever the layout. The tokens of a global batch are split
over the dp x sp ranks of `Trainee.token_group` (dp ranks read different rows, sp ranks different slices of
the same rows; tp ranks and the stages of a pipeline share their tokens). Counts and loss sums are summed
over that group; each rank backpropagates sum_local / count_global * token_shards, and the gradient
reduction averages over the same ranks, so every layout computes the gradient of the same number as one
process would.

Variants of training (trainers.stn) pass their own step function to `train`, which runs it in place of
`train_step` and keeps everything else: restore, schedule, validation, reporting, checkpoints.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainers.checkpoint import TrainState, write_reported_steps
from trainers.config import TrainerConfig
from trainers.data import IGNORE_INDEX, Batch, BatchPlan, PackedRows, validation_rows
from trainers.export import write_model_card
from trainers.metrics import StepMetrics
from trainers.prefetch import prefetch
from trainers.reporter import Reporter, staging_dir
from trainers.schedules import lr_at


class Engine(Protocol):
    """What turns losses into updates and checkpoints (trainers.engines: FSDPEngine, DeepSpeedEngine)."""

    model: torch.nn.Module
    """Called for the forward pass."""
    optimizer: torch.optim.Optimizer
    """Its param_groups' "lr" is what the loop sets each step."""

    def set_gradient_sync(self, enabled: bool) -> None:
        """False while accumulating: the backward of the last micro-batch (True) reduces gradients."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip, update, zero the gradients; returns the global gradient norm before clipping."""

    def save(self, path: Path, state: TrainState) -> None:
        """Collective: this rank's part of a checkpoint into `path`."""

    def load(self, path: Path) -> TrainState:
        """Collective: restore model, optimizer, RNG from a complete checkpoint."""


@dataclass
class Trainee:
    """What the loop trains, built by trainers.run from the config."""

    cfg: TrainerConfig
    engine: Engine
    train_rows: PackedRows
    val_rows: PackedRows
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    autocast_dtype: torch.dtype | None = None
    """Lower-precision compute for an unsharded model (FSDP's mixed-precision policy covers sharded ones)."""
    sp_rank: int = 0
    sp_size: int = 1
    """Sequence parallelism: this rank keeps slice sp_rank of sp_size of every row it reads."""
    pipeline: Any = None
    """trainers.parallel.pipeline.Pipeline when parallel.pp > 1: forward and backward run through its schedule."""
    adaptive: Any = None
    """trainers.parallel.adaptive.AdaptiveSequenceParallel when parallel.sp_mode = adaptive: steps of whole
    documents, split over SP groups of mixed degrees by the planner."""
    token_group: dist.ProcessGroup | None = None
    """The ranks holding different tokens of a global batch (trainers.parallel.mesh.token_group): dp x sp, the
    whole world under adaptive SP, the dp x sp ranks of this stage under pp; None for one process."""

    @property
    def token_shards(self) -> int:
        """How many ranks hold different tokens of a global batch: what the gradient reduction averages over."""
        return 1 if self.token_group is None else dist.get_world_size(self.token_group)

    def token_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed in place over the token group: a count or loss sum of the whole global batch."""
        if self.token_group is not None:
            dist.all_reduce(x, group=self.token_group)
        return x

    def local(self, batch: Batch) -> Batch:
        """The part of a batch of this rank's rows that this rank computes on."""
        if self.sp_size == 1:
            return batch
        from trainers.parallel.sequence import shard_sequence

        return shard_sequence(batch, self.sp_rank, self.sp_size)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer


def token_loss_sum(t: Trainee, batch: Batch) -> torch.Tensor:
    with torch.autocast(t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None):
        logits = t.model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    return summed_cross_entropy(logits, batch.targets)


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token loss of (B, S, vocab) logits against (B, S) targets, IGNORE_INDEX left out."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def validate(t: Trainee) -> float:
    t.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=t.device)
    for micro in t.adaptive.validation_micro_batches() if t.adaptive is not None else ():
        t.adaptive.route(micro)
        total[0] += token_loss_sum(t, micro.batch.to(t.device)).double()
        total[1] += micro.batch.num_targets
    for rows in () if t.adaptive is not None else validation_rows(len(t.val_rows), t.cfg.train.micro_batch_size, t.cfg.train.val_batches, t.dp_rank, t.dp_size):
        batch = t.local(t.val_rows.batch(rows)).to(t.device)
        total[0] += token_loss_sum(t, batch).double() if t.pipeline is None else t.pipeline.forward_loss(batch)
        total[1] += batch.num_targets
    t.model.train()
    total = t.token_sum(total)
    return float(total[0] / total[1])


def step_batches(t: Trainee, plan: BatchPlan, step: int) -> list[Batch] | None:
    """This rank's micro-batches of `step`, as it computes on them; None under adaptive SP, whose executor
    builds its steps itself."""
    if t.adaptive is not None:
        return None
    return [t.local(t.train_rows.batch(plan.rows(step, micro))) for micro in range(t.cfg.train.grad_accum)]


def train_step(t: Trainee, plan: BatchPlan, step: int, batches: list[Batch] | None = None) -> tuple[float, float, int, dict]:
    """One optimizer step; returns (loss, grad norm, tokens in the global batch, the step's plan metrics).
    `batches`: the step's step_batches() when they were built ahead; built here otherwise."""
    if t.adaptive is not None:
        return adaptive_train_step(t, step)
    accum = t.cfg.train.grad_accum
    batches = step_batches(t, plan, step) if batches is None else batches
    local = [sum(b.num_targets for b in batches), sum(b.tokens.numel() for b in batches)]
    counts = t.token_sum(torch.tensor(local, dtype=torch.float64, device=t.device))
    n_targets, n_tokens = counts[0], int(counts[1])
    if t.pipeline is not None:
        loss_sum = t.pipeline.train_step([b.to(t.device) for b in batches], float(t.token_shards / n_targets))
        grad_norm = t.engine.step()
        return float(t.token_sum(loss_sum) / n_targets), grad_norm, n_tokens, {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.device)
    for micro, batch in enumerate(batches):
        t.engine.set_gradient_sync(micro == accum - 1)
        token_loss = token_loss_sum(t, batch.to(t.device))
        t.engine.backward(token_loss * (t.token_shards / n_targets))
        loss_sum += token_loss.detach().double()
    grad_norm = t.engine.step()
    loss = t.token_sum(loss_sum) / n_targets
    return float(loss), grad_norm, n_tokens, {}


def adaptive_train_step(t: Trainee, step: int) -> tuple[float, float, int, dict]:
    """One step of whole documents as the SP planner split it: every rank runs each micro-batch in its
    group; the normalisation is the module docstring's, with all ranks holding different tokens."""
    work = t.adaptive.step(step)
    # Gradients are reduce-scattered to their shards after every micro-batch, never accumulated unsharded: the
    # planner packs micro-batches under the cost model's ZeRO-3 model states (16 B/param over all devices), and
    # deferring the reduction would add every unit's float32 gradients to each device. For FlexSP's 7B on 64
    # devices that is 25.1 GiB of its 28 GiB cap: 393 tokens a device instead of 6,041, so no document over
    # 12,586 tokens fits (a degree-32 group, the heads' cap) and a 1M-token step of documents up to 12k tokens
    # plans 44 micro-batches (37.3 s) instead of 3 (5.8 s). The extra reduce-scatters are within the cost
    # model's per-micro-batch b, measured on ZeRO-3, which reduces every micro-batch too.
    t.engine.set_gradient_sync(True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.device)
    for micro in work.micro_batches:
        t.adaptive.route(micro)
        # SP domains (parallel.dp_replicate) run as many micro-batches as their shares need: the all-reduce
        # between them waits for each domain's last (FSDP2 sums the reduce-scattered shards until then)
        t.engine.set_replica_sync(micro is work.micro_batches[-1])
        token_loss = token_loss_sum(t, micro.batch.to(t.device))
        t.engine.backward(token_loss * (t.token_shards / work.n_targets))
        loss_sum += token_loss.detach().double()
    grad_norm = t.engine.step()
    loss = t.token_sum(loss_sum) / work.n_targets
    return float(loss), grad_norm, work.n_tokens, work.metrics


class Cadence:
    """Sends each step's metrics on, batched: a report every train.log_every steps, at each validation,
    and with a checkpoint every checkpoint.every steps and at the last step."""

    def __init__(self, t: Trainee, reporter: Reporter):
        self.t, self.reporter = t, reporter
        self.unreported: list[dict] = []

    def validation_due(self, done: int) -> bool:
        every = self.t.cfg.train.val_every
        return bool(every) and (done % every == 0 or done == self.t.cfg.train.steps)

    def step_done(self, state: TrainState, metrics: dict) -> None:
        cfg, done = self.t.cfg, state.step
        self.unreported.append(metrics)
        if done == cfg.train.steps or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
            with staging_dir() as part:
                write_model_card(Path(part), cfg)
                self.t.engine.save(Path(part), state)
                write_reported_steps(Path(part), self.unreported)
                self.reporter.report(self.unreported, checkpoint_dir=Path(part))
            self.unreported = []
        elif done % cfg.train.log_every == 0 or "val_loss" in metrics:
            self.reporter.report(self.unreported)
            self.unreported = []


def restore_keeping_config_hparams(t: Trainee, path: Path) -> TrainState:
    """Restore a checkpoint, but keep this config's optimizer hyperparameters: loading an optimizer's
    state brings back the weight decay, betas and eps it was saved with, which would silently undo an
    `-o optim.weight_decay=...` given on resume (or a PBT perturbation). The learning rate is set every step."""
    kept = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in t.optimizer.param_groups]
    state = t.engine.load(path)
    for group, values in zip(t.optimizer.param_groups, kept):
        group.update(values)
    return state


StepFn = Callable[[Trainee, BatchPlan, int, "list[Batch] | None"], tuple[float, float, int, dict]]
"""One optimizer step, as train_step: (trainee, plan, step, the step's batches) -> (loss, grad norm, tokens in the
global batch, further metrics of the step)."""


def train(t: Trainee, reporter: Reporter, step_fn: StepFn = train_step) -> TrainState:
    """Train to cfg.train.steps from the latest checkpoint, if any; `step_fn` runs each optimizer step. The model
    is validated and checkpointed as step_fn leaves it."""
    cfg = t.cfg
    state = TrainState()
    with reporter.latest_checkpoint() as checkpoint:
        if checkpoint is not None:
            state = restore_keeping_config_hparams(t, Path(checkpoint))
    plan = BatchPlan(len(t.train_rows), cfg.train.micro_batch_size, cfg.train.grad_accum, t.dp_rank, t.dp_size, cfg.train.seed)
    meter = StepMetrics(cfg, t.device)
    if state.step == 0 and cfg.train.val_every:
        reporter.report([{"step": 0, "val_loss": validate(t)}])
    cadence = Cadence(t, reporter)
    depth = 0 if t.adaptive is not None else cfg.data.prefetch  # the adaptive executor plans ahead on its own

    with prefetch(functools.partial(step_batches, t, plan), range(state.step, cfg.train.steps), depth) as upcoming:
        for step, batches in upcoming:
            lr = lr_at(step, cfg.train.steps, cfg.optim)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            loss, grad_norm, n_tokens, step_metrics = step_fn(t, plan, step, batches)
            state = TrainState(step=step + 1, tokens_seen=state.tokens_seen + n_tokens)

            done = state.step
            metrics = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen}
            metrics |= step_metrics
            metrics |= meter.throughput(n_tokens, time.perf_counter() - started)
            if cadence.validation_due(done):
                metrics["val_loss"] = validate(t)
            cadence.step_done(state, metrics)
    return state
