"""The executor of adaptive sequence parallelism: runs each step as the planner split it.

Every rank builds the same plan from the same lengths (the planner is pure and the step's sequences are a
pure function of (step, seed)), so no rank ever sends another its plan. Per micro-batch every rank is in
exactly one group (the degrees sum to the devices): it packs its group's sequences end to end into one row,
padded to a multiple of the degree, keeps its contiguous 1/degree of that row (trainers.parallel.sequence
.shard_sequence), and attention runs Ulysses over the group's process group, or plainly for degree 1. Every
rank runs one forward and backward per micro-batch, which FSDP's per-block collectives over all ranks need:
a group the plan left without sequences runs on a row of padding, which carries no loss.

Process groups for every aligned group (degree 2, 4, ... at offsets that are multiples of the degree) are
created once at start-up, in the same order on every rank. The plan of step n+1 is computed in a background
thread while step n runs.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from trainers.attention import AttentionFn
from trainers.data import Batch
from trainers.documents import DocumentBatches, DocumentSequences
from trainers.parallel.adaptive.cost import CostModel, degrees_up_to
from trainers.parallel.adaptive.planner import SPPlan, plan_adaptive
from trainers.parallel.sequence import shard_sequence, ulysses


class GroupRouter:
    """The process group of every aligned SP group, and the one the current micro-batch runs in."""

    def __init__(self, devices: int):
        self.devices = devices
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for degree in degrees_up_to(devices)[1:]:
            for first in range(0, devices - degree + 1, degree):
                ranks = tuple(range(first, first + degree))
                self.groups[ranks] = dist.new_group(list(ranks))  # collective: every rank, same order
        self.current: dist.ProcessGroup | None = None
        """None: a degree-1 group, attention on this rank alone. Left set through the backward pass, which
        recomputes blocks under activation checkpointing."""

    def route(self, ranks: tuple[int, ...]) -> None:
        self.current = None if len(ranks) == 1 else self.groups[tuple(ranks)]

    def attention(self, inner: AttentionFn) -> AttentionFn:
        def routed(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
            if self.current is None:
                return inner(q, k, v, **kwargs)
            return ulysses(inner, self.current, q, k, v, **kwargs)

        return routed


@dataclass
class MicroBatchWork:
    batch: Batch
    """This rank's slice of its group's packed sequences."""
    ranks: tuple[int, ...]
    """The group that computes it."""


@dataclass
class StepWork:
    micro_batches: list[MicroBatchWork]
    n_targets: int
    """Targets of the whole global batch (every rank knows every sequence: no reduction needed)."""
    n_tokens: int
    metrics: dict[str, float]
    """sp/micro_batches, sp/groups_degree_<d> and sp/idle_groups (groups left without a sequence, on
    padding), summed over micro-batches; sp/estimated_s, sp/planning_ms."""


class AdaptiveSequenceParallel:
    """Turns global steps of whole documents into this rank's micro-batches, through the planner."""

    def __init__(self, sequences: DocumentSequences, batches: DocumentBatches, val: DocumentSequences, val_batches: int,
                 cost: CostModel, devices: int, rank: int, router: GroupRouter | None):
        self.sequences, self.batches, self.cost = sequences, batches, cost
        self.devices, self.rank, self.router = devices, rank, router
        self._val, self._val_batches, self._val_work = val, val_batches, None
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sp-planner")
        self._ahead: dict[int, Future] = {}

    def _plan(self, ids: list[int]) -> tuple[SPPlan, float]:
        started = time.perf_counter()
        plan = plan_adaptive(self.sequences.lengths[ids].tolist(), self.devices, self.cost)
        return plan, (time.perf_counter() - started) * 1e3

    def _planned(self, step: int) -> tuple[list[int], SPPlan, float]:
        future = self._ahead.pop(step, None)
        ids = self.batches.sequences(step)
        plan, ms = future.result() if future is not None else self._plan(ids)
        next_ids = self.batches.sequences(step + 1)
        self._ahead = {step + 1: self._planner.submit(self._plan, next_ids)}  # overlaps this step's compute
        return ids, plan, ms

    def step(self, step: int) -> StepWork:
        ids, plan, planning_ms = self._planned(step)
        return share_of(plan, ids, self.sequences, self.rank, planning_ms)

    def route(self, micro: MicroBatchWork) -> None:
        """Attention of the next forward (and its backward) runs in `micro`'s group."""
        if self.router is not None:
            self.router.route(micro.ranks)

    def validation_micro_batches(self) -> list[MicroBatchWork]:
        """The validation split's first sequences in order, cut by the step budget: the same every time."""
        if self._val_work is None:
            ordered = DocumentBatches(self._val.lengths, self.batches.tokens_per_step, seed=0, shuffle=False)
            steps = [ordered.sequences(b) for b in range(min(self._val_batches, ordered.steps_in_epoch(0)))]
            self._val_work = [micro for ids in steps for micro in share_of(
                plan_adaptive(self._val.lengths[ids].tolist(), self.devices, self.cost), ids, self._val, self.rank,
                0.0).micro_batches]
        return self._val_work


def share_of(plan: SPPlan, ids: list[int], sequences: DocumentSequences, rank: int, planning_ms: float) -> StepWork:
    """Rank `rank`'s share of a plan of the sequences `ids` (the plan's sequence indices index `ids`)."""
    micro_batches, degrees, idle = [], Counter(), 0
    for micro in plan.micro_batches:
        degrees.update(g.degree for g in micro.groups)
        idle += sum(not g.sequences for g in micro.groups)
        group = next(g for g in micro.groups if rank in g.ranks)
        packed = sequences.packed([ids[s] for s in group.sequences], pad_to_multiple=group.degree)
        local = shard_sequence(packed, rank - group.ranks[0], group.degree)
        micro_batches.append(MicroBatchWork(local, tuple(group.ranks)))
    tokens = int(sequences.lengths[ids].sum())
    metrics = {"sp/micro_batches": float(len(plan.micro_batches)), "sp/estimated_s": plan.estimated_s,
               "sp/planning_ms": planning_ms, "sp/idle_groups": float(idle)}
    metrics |= {f"sp/groups_degree_{d}": float(degrees.get(d, 0)) for d in degrees_up_to(plan.devices)}
    return StepWork(micro_batches, n_targets=tokens, n_tokens=tokens, metrics=metrics)
