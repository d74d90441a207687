"""The adaptive SP planner, a pure function: (sequence lengths, devices, cost model) -> plan.

1. Micro-batches ("sequence blaster"): the fewest that fit. Starting from the token lower bound
   ceil(total / capacity of all devices), sequences sorted longest first are dealt to the least-loaded
   micro-batch (LPT by tokens); if some micro-batch cannot be laid out, one more is tried.
2. Per micro-batch, candidate layouts of power-of-two groups (every homogeneous degree; and one group of the
   degree the longest sequence needs with the rest at each smaller degree), each laid out largest first at
   consecutive offsets, so every group is aligned and none straddles a node. Sequences go longest first to
   the group where they finish earliest (memory permitting), then a bounded local search moves sequences off
   the slowest group. The layout whose slowest group is fastest wins; every group must hold a sequence
   (each rank runs every micro-batch: FSDP's collectives span all of them).
Deterministic: stable sorts, no randomness, ties broken by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainers.parallel.adaptive.cost import CostModel, degrees_up_to

LOCAL_SEARCH_MOVES = 64  # moves off the slowest group per micro-batch; more gained < 0.5% in trials here


class InfeasibleError(ValueError):
    """A sequence that no group of the SP domain can hold."""


@dataclass(frozen=True)
class Group:
    degree: int
    ranks: tuple[int, ...]
    sequences: tuple[int, ...]
    estimated_s: float


@dataclass(frozen=True)
class MicroBatch:
    groups: tuple[Group, ...]
    estimated_s: float


@dataclass(frozen=True)
class SPPlan:
    devices: int
    micro_batches: tuple[MicroBatch, ...]
    estimated_s: float
    planning_ms: float = 0.0

    def to_json_dict(self) -> dict:
        return {"devices": self.devices, "estimated_s": self.estimated_s, "planning_ms": self.planning_ms,
                "micro_batches": [{"estimated_s": m.estimated_s, "groups": [
                    {"degree": g.degree, "ranks": list(g.ranks), "sequences": list(g.sequences)} for g in m.groups]}
                    for m in self.micro_batches]}


def _layout(devices: int, degrees: list[int]) -> list[int]:
    """`degrees` (descending powers of two) then the remainder filled with the largest powers that fit."""
    out, left = [], devices
    for d in degrees:
        if d <= left:
            out.append(d)
            left -= d
    while left:
        d = 2 ** int(math.log2(left))
        out.append(d)
        left -= d
    return sorted(out, reverse=True)


def _homogeneous(devices: int, degree: int) -> list[int]:
    return _layout(devices, [degree] * (devices // degree))


def _candidates(lengths: np.ndarray, devices: int, cost: CostModel, degree: int | None) -> list[list[int]]:
    if degree is not None:
        return [_homogeneous(devices, degree)]
    needed = static_degree(lengths, devices, cost)
    layouts = [_homogeneous(devices, d) for d in degrees_up_to(devices) if d >= needed]
    layouts += [_layout(devices, [needed] + [k] * devices) for k in degrees_up_to(needed)[:-1]]
    unique = []
    for layout in layouts:
        if layout not in unique:
            unique.append(layout)
    return unique


def _assign(lengths: np.ndarray, layout: list[int], devices: int, cost: CostModel):
    """(max ms, per-group sequence lists, per-group ms) or None if it does not fit or leaves a group empty."""
    degrees = np.asarray(layout)
    room = np.array([cost.max_tokens(d, devices) for d in layout])
    load = np.full(len(layout), cost.overhead_ms)
    members: list[list[int]] = [[] for _ in layout]
    order = np.argsort(-lengths, kind="stable")
    times = {d: np.array([cost.sequence_ms(s, d) for s in lengths]) for d in set(layout)}
    per = np.stack([times[d] for d in layout])  # (groups, sequences) ms of each sequence in each group
    for i in order:
        finish = np.where(room >= lengths[i], load + per[:, i], np.inf)
        g = int(np.argmin(finish))
        if not np.isfinite(finish[g]):
            return None
        members[g].append(int(i))
        load[g] += per[g, i]
        room[g] -= lengths[i]
    for g in range(len(layout)):  # an empty group takes the shortest sequence of a group holding several
        if not members[g]:
            donors = [h for h in range(len(layout)) if len(members[h]) > 1]
            candidates = [(lengths[i], h, i) for h in donors for i in members[h] if lengths[i] <= room[g]]
            if not candidates:
                return None
            _, h, i = min(candidates)
            members[h].remove(i)
            members[g].append(i)
            load[h] -= per[h, i]
            load[g] += per[g, i]
            room[h] += lengths[i]
            room[g] -= lengths[i]
    for _ in range(LOCAL_SEARCH_MOVES):
        worst = int(np.argmax(load))
        if len(members[worst]) < 2:
            break
        best = None
        for i in members[worst]:
            for g in range(len(layout)):
                if g != worst and room[g] >= lengths[i]:
                    new_max = max(load[worst] - per[worst, i], load[g] + per[g, i])
                    if new_max < load[worst] - 1e-9 and (best is None or new_max < best[0]):
                        best = (new_max, i, g)
        if best is None:
            break
        _, i, g = best
        members[worst].remove(i)
        members[g].append(i)
        load[worst] -= per[worst, i]
        load[g] += per[g, i]
        room[worst] += lengths[i]
        room[g] -= lengths[i]
    return float(load.max()), members, load


def _micro_batch(lengths: np.ndarray, ids: np.ndarray, devices: int, cost: CostModel, degree: int | None):
    best = None
    for layout in _candidates(lengths[ids], devices, cost, degree):
        result = _assign(lengths[ids], layout, devices, cost)
        if result is not None and (best is None or result[0] < best[0][0]):
            best = (result, layout)
    if best is None:
        return None
    (worst, members, load), layout = best
    groups, first = [], 0
    for d, seqs, ms in zip(layout, members, load):
        groups.append(Group(d, tuple(range(first, first + d)), tuple(sorted(int(ids[i]) for i in seqs)), ms / 1e3))
        first += d
    return MicroBatch(tuple(groups), worst / 1e3)


def _check(lengths, devices: int, cost: CostModel) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError("lengths must be a non-empty list of sequence lengths")
    if devices < 1:
        raise ValueError(f"devices = {devices}: must be at least 1")
    if lengths.min() < 1:
        raise ValueError(f"lengths: {int(lengths.min())} is not a sequence length (at least 1)")
    return lengths


def static_degree(lengths, devices: int, cost: CostModel) -> int:
    """The smallest power-of-two degree whose group holds the longest sequence (static Ulysses)."""
    lengths = _check(lengths, devices, cost)
    longest = int(np.argmax(lengths))
    for d in degrees_up_to(devices):
        if cost.max_tokens(d, devices) >= lengths[longest]:
            return d
    largest = degrees_up_to(devices)[-1]
    raise InfeasibleError(f"sequence {longest} has {int(lengths[longest])} tokens: more than the largest group "
                          f"(degree {largest}) can hold, {cost.max_tokens(largest, devices):.0f} tokens")


def _plan(lengths, devices: int, cost: CostModel, degree: int | None) -> SPPlan:
    lengths = _check(lengths, devices, cost)
    static_degree(lengths, devices, cost)  # refuses what no group holds
    capacity = cost.max_tokens(1, devices) * devices
    order = np.argsort(-lengths, kind="stable")
    m = max(1, math.ceil(lengths.sum() / capacity)) if capacity > 0 else 1
    while m <= len(lengths):
        bins = [[] for _ in range(m)]
        tokens = np.zeros(m)
        for i in order:
            b = int(np.argmin(tokens))
            bins[b].append(int(i))
            tokens[b] += lengths[i]
        micro = [_micro_batch(lengths, np.asarray(ids), devices, cost, degree) for ids in bins if ids]
        if all(mb is not None for mb in micro):
            return SPPlan(devices, tuple(micro), sum(mb.estimated_s for mb in micro))
        m += 1
    raise InfeasibleError(f"no layout of degree {degree} holds these sequences on {devices} devices")


def plan_adaptive(lengths, devices: int, cost: CostModel) -> SPPlan:
    """Groups of mixed degrees per micro-batch; never worse than the best homogeneous plan."""
    adaptive = _plan(lengths, devices, cost, None)
    best = best_homogeneous(lengths, devices, cost)
    return adaptive if adaptive.estimated_s <= best.estimated_s else best


def plan_homogeneous(lengths, devices: int, cost: CostModel, degree: int) -> SPPlan:
    """Every group of `degree` (a remainder of devices, when `degree` does not divide them, in smaller groups)."""
    if degree not in degrees_up_to(devices):
        raise ValueError(f"degree = {degree}: must be a power of two at most devices = {devices}")
    return _plan(lengths, devices, cost, degree)


def best_homogeneous(lengths, devices: int, cost: CostModel) -> SPPlan:
    needed = static_degree(lengths, devices, cost)
    plans = []
    for d in degrees_up_to(devices):
        if d >= needed:
            try:
                plans.append(plan_homogeneous(lengths, devices, cost, d))
            except InfeasibleError:
                continue
    return min(plans, key=lambda p: p.estimated_s)
