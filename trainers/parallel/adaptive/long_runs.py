"""Micro-batches of mixed degrees for a step with long sequences (FlexSP's "sequence blaster", made greedy).

The length-sorted sequences are cut into runs of about equal tokens, as many as memory needs at the least.
While the next run is a long one (SMALL_RUN: few sequences, on wide groups) it is planned as a micro-batch,
after its boundary with the run after it has been moved a sequence at a time while that makes the pair faster.
A few long sequences rarely balance their groups: the time those groups leave idle takes the longest other
sequences that fit it, and the runs are then cut again from what is left. The short sequences left are split
into the fewest runs their tokens need, so they do not need a micro-batch of their own (b, ~4% of a step) for
the few that would not fit beside the long runs; where they are a little over a whole number of runs, the
excess joins the long runs, which are re-planned. A step without long runs is split by work and by tokens
(search.py).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from trainers.parallel.adaptive.bounds import fewest_micro_batches
from trainers.parallel.adaptive.plan import Group, MicroBatch, total_s
from trainers.parallel.adaptive.search import StepPlanner
from trainers.parallel.adaptive.splits import MIXED_SPLITS, REST_SPLITS, SORTED_FILL, sorted_by_tokens

# Chosen on the bench's seeds 0-99 before the degree cap, re-checked with it (64 devices, heavy tail, 512
# sequences, flexsp-7b, degrees <= 32, median speed-up over static Ulysses 1.469x):
REST_FILL = 0.99  # of the devices' memory the short sequences left after the long runs may take: they pack
# tightly; 0.98 lost 0.25% (median), 1.0 gained 0.01% (median)
SMALL_RUN = 40 / 64  # runs of at most this many sequences per device are long ones: 30/64 lost 0.25% (median),
# 50/64 0.04% (mean)
SPILL_MOST = 0.5  # of a micro-batch's memory: a larger excess of the short sequences needs its own micro-batch;
# 0.25 lost 0.25% (median), 1.0 made the same plans
SPILL_FILLS = (REST_FILL, SORTED_FILL)  # the fill of the micro-batch fewer that the spill aims at: REST_FILL's
# where the rest packs that tightly, SORTED_FILL's where it did not (a rest of 763k tokens in 3 micro-batches on
# 64 devices, of 2 at 0.99); REST_FILL alone lost 0.3% (median) and 0.6% (mean), SORTED_FILL alone 0.25% (median)
# and a micro-batch on 16 devices (test_sp_planner's seed 8)
BOUNDARY_PASSES = 1  # over the long runs' boundaries, each moving one sequence: 2 gained 0.05% of the mean speed-up
# (none of the median: 1.4691x with 1, 1.4689x with 2) for 1.1x the planning time (p50, 1,024 sequences)
REFINE_SEQUENCES = 4096  # steps of more sequences skip the boundary shifts, the spill and the plan without the last
# long run: on 1,024 devices, 16,000 sequences (heavy, seeds 0-7) they moved the median estimate by under 0.1% and
# took 130 ms of 300; a step of 512 sequences on 64 devices takes them in a few ms


def plan_mixed(planner: StepPlanner) -> list[MicroBatch] | None:
    """The step's micro-batches of mixed degrees, or None if none fit. Each long run is planned in turn from
    the sequences left (so those its idle time took are not planned again in the next), then the rest is split.
    Where that plan has more micro-batches than memory needs, the plan without the last long run (its
    sequences split with the rest) is tried too: a run of middling sequences can cost a micro-batch of its own
    that the short ones would have shared."""
    everything = np.arange(len(planner.lengths))
    refining = len(everything) <= REFINE_SEQUENCES
    after_each_run = _long_runs(planner, refining)
    if after_each_run is None or len(after_each_run) == 1:
        return planner.best_split(everything, MIXED_SPLITS, math.inf)
    best, best_s = None, math.inf
    fewest = fewest_micro_batches(planner.table, everything)
    for head, remaining in after_each_run[-1:-3:-1]:
        if best is not None and (len(best) <= fewest or not refining):
            break
        # The plan without the last long run: its rest is planned only while it can beat the plan with it, and
        # the spill aims at one micro-batch fewer than the rest takes at the least where the rest could not
        budget_ms = (best_s - total_s(head)) * 1e3 if best is not None else math.inf
        rest = planner.best_split(remaining, REST_SPLITS, budget_ms, REST_FILL) if len(remaining) else []
        if rest is None:
            if refining:
                plan = spill(planner, head, remaining, fewest_micro_batches(planner.table, remaining), best_s)
                if plan is not None:
                    best, best_s = plan, total_s(plan)
            continue
        plan = (spill(planner, head, remaining, len(rest), min(best_s, total_s(head) + total_s(rest)))
                if refining else None) or head + rest
        if total_s(plan) < best_s:
            best, best_s = plan, total_s(plan)
    return best or planner.best_split(everything, MIXED_SPLITS, math.inf)


def _long_runs(planner: StepPlanner, refining: bool) -> list[tuple[list[MicroBatch], np.ndarray]] | None:
    """The long runs' micro-batches, one after another, each with what its groups' idle time took: (those
    planned so far, the sequences left) before the first and after each; None if a run fits no layout."""
    lengths, devices = planner.lengths, planner.devices
    longest_first = np.argsort(-lengths, kind="stable")
    alive = np.ones(len(lengths), dtype=bool)
    remaining, head = np.arange(len(lengths)), []
    after_each_run = [(head, remaining)]
    while len(remaining):
        # the next two runs of the sorted sequences left, each of about an equal share of their tokens
        order = (np.cumsum(alive) - 1)[longest_first[alive[longest_first]]]  # positions in `remaining`
        runs = [remaining[r] for r in sorted_by_tokens(planner.split_input[remaining],
                                                       fewest_micro_batches(planner.table, remaining), 2, order)]
        if len(runs[0]) > SMALL_RUN * devices:
            break
        if refining and len(runs) > 1 and len(runs[1]) <= SMALL_RUN * devices:
            shift_boundaries(planner, runs, 2)
        mb = planner.micro_batch(runs[0])
        if mb is None:
            return None
        alive[runs[0]] = False
        (mb,), remaining = fill_idle(planner, [mb], np.flatnonzero(alive))
        alive[:] = False
        alive[remaining] = True
        remaining = np.flatnonzero(alive)
        head = head + [mb]
        after_each_run.append((head, remaining))
    return after_each_run


def shift_boundaries(planner: StepPlanner, runs: list[np.ndarray], n_long: int) -> None:
    """Moves a sequence across the boundary of each pair of the first `n_long` runs (the shortest of the one
    to the next, or the longest of the next to the one) while that makes the pair faster: a long sequence that
    shares a wide group may run better on its own group in the next micro-batch, and the reverse. A move whose
    micro-batches' bounds cannot beat the pair is not planned."""
    def bound_s(ids):
        return planner.layout_bound_ms(ids) / 1e3

    def pair_s(a, b, beat: float) -> float:
        """The pair's estimate, or inf once it cannot be under `beat`: the second run is not planned when the
        first's plan and the second's bound already reach it (planning is most of the cost)."""
        x = planner.micro_batch(a)
        if x is None or x.estimated_s + bound_s(b) >= beat:
            return math.inf
        y = planner.micro_batch(b)
        return math.inf if y is None else x.estimated_s + y.estimated_s

    for _ in range(BOUNDARY_PASSES):
        moved = False
        for r in range(n_long - 1):
            a, b = runs[r], runs[r + 1]
            moves = [(a[:-1], np.concatenate([a[-1:], b]))] if len(a) > 1 else []
            moves += [(np.concatenate([a, b[:1]]), b[1:])] if len(b) > 1 else []
            if not moves:
                continue
            # The fastest move under the pair as it is (ties: the first), each planned only while its bound can
            # beat the best so far
            best_s, pick = pair_s(a, b, math.inf) - 1e-12, None
            for x, y in moves:
                if bound_s(x) + bound_s(y) < best_s:
                    took = pair_s(x, y, best_s)
                    if took < best_s:
                        best_s, pick = took, (x, y)
            if pick is not None:
                runs[r], runs[r + 1] = pick
                moved = True
        if not moved:
            break


def fill_idle(planner: StepPlanner, mbs: list[MicroBatch], pool: np.ndarray) -> tuple[list[MicroBatch], np.ndarray]:
    """The groups of `mbs` that finish before their micro-batch's slowest take sequences of `pool` while they
    finish no later and memory holds them: the longest that fits each time (first-fit decreasing packs the
    idle time tighter than shortest first, 0.3% on the bench), groups with the most idle time first. Returns
    the micro-batches and what is left of the pool. A group's time and memory are sums over its sequences, so
    this is exact: no micro-batch gets slower."""
    lengths, table = planner.lengths, planner.table
    alive = np.zeros(len(lengths), dtype=bool)
    alive[pool] = True
    pool = planner.shortest_first[alive[planner.shortest_first]]  # ties by index, as a stable sort would
    sizes = lengths[pool]
    idle = sorted((g.estimated_s - mb.estimated_s, j, k) for j, mb in enumerate(mbs) for k, g in enumerate(mb.groups)
                  if g.estimated_s < mb.estimated_s)
    # below[i]: the longest sequence not yet taken at or before pool position i (-1: none), followed through
    # the taken ones and shortened as it goes: each group then finds the longest that fits in O(log n)
    below = list(range(len(pool)))

    def untaken(i: int) -> int:
        root = i
        while root >= 0 and below[root] != root:
            root = below[root]
        while i > root:
            below[i], i = root, below[i]
        return root

    ms_of: dict[int, tuple[np.ndarray, bool]] = {}  # per degree: the pool's ms, and whether it grows with length
    added: dict[tuple[int, int], list[int]] = {}
    for minus_idle, j, k in idle:
        g = mbs[j].groups[k]
        slack = -minus_idle * 1e3
        room = planner.capacity[g.degree] - float(lengths[list(g.sequences)].sum())
        if g.degree not in ms_of:
            ms = table.ms[table.row(g.degree), pool]
            ms_of[g.degree] = ms, bool(np.all(np.diff(ms) >= 0))
        ms, monotone = ms_of[g.degree]
        taken = []
        while True:
            if monotone:
                last = min(int(np.searchsorted(ms, slack, side="right")),
                           int(np.searchsorted(sizes, room, side="right"))) - 1
                q = untaken(last) if last >= 0 else -1
            else:
                fits = [i for i in range(len(pool)) if below[i] == i and ms[i] <= slack and sizes[i] <= room]
                q = fits[-1] if fits else -1
            if q < 0:
                break
            below[q] = q - 1
            taken.append(q)
            slack, room = slack - float(ms[q]), room - float(sizes[q])
        if taken:
            added[(j, k)] = taken
    out = []
    for j, mb in enumerate(mbs):
        groups = list(mb.groups)
        for k, g in enumerate(groups):
            if (j, k) in added:
                seqs = np.concatenate([np.asarray(g.sequences, dtype=np.int64), pool[added[(j, k)]]])
                ms = planner.fixed_ms[g.degree] + float(table.ms[table.row(g.degree), seqs].sum())
                groups[k] = Group(g.degree, g.ranks, tuple(sorted(seqs.tolist())), ms / 1e3)
        out.append(MicroBatch(tuple(groups), max(g.estimated_s for g in groups)))
    left = np.ones(len(pool), dtype=bool)
    for taken in added.values():
        left[taken] = False
    return out, pool[left]


def spill(planner: StepPlanner, head: list[MicroBatch], pool: np.ndarray, rest_micro_batches: int,
          beat_s: float) -> list[MicroBatch] | None:
    """The short sequences a little over a whole number of micro-batches cost one more (b, and a layout packed
    for few): their shortest, as many tokens as that excess, go to the long runs with the most memory left,
    which are re-planned (a run of a few long sequences and some short ones is often laid out better than the
    long ones alone in the idle time fill_idle found). `rest_micro_batches`: how many the pool's plan has. The
    fastest plan if one is faster than `beat_s`, else None."""
    best, best_s = None, beat_s
    for fill in SPILL_FILLS:
        plan = _spill(planner, head, pool, rest_micro_batches - 1, fill, best_s)
        if plan is not None:
            best, best_s = plan, total_s(plan)
    return best


def _spill(planner: StepPlanner, head: list[MicroBatch], pool: np.ndarray, runs: int, fill: float,
           beat_s: float) -> list[MicroBatch] | None:
    """`pool` in `runs` micro-batches of `fill` of the memory each, the tokens over that to the long runs."""
    if not len(pool):
        return None
    lengths = planner.lengths
    capacity = planner.table.tokens_per_micro_batch()
    excess = float(lengths[pool].sum()) - runs * capacity * fill
    if excess > SPILL_MOST * capacity or excess <= 0:
        return None
    heads_ids = [np.asarray(sorted(i for g in mb.groups for i in g.sequences)) for mb in head]
    room = [capacity * SORTED_FILL - float(lengths[ids].sum()) for ids in heads_ids]
    if sum(max(0.0, r) for r in room) < excess:
        return None
    order = pool[np.argsort(lengths[pool], kind="stable")]
    n = int(np.searchsorted(np.cumsum(lengths[order]), excess, side="left")) + 1
    moved, left = order[:n], order[n:]
    given: list[list[int]] = [[] for _ in head]
    heap = [(-r, j) for j, r in enumerate(room)]  # each to the run with the most memory left
    heapq.heapify(heap)
    for i in moved.tolist():
        r, j = heapq.heappop(heap)
        given[j].append(i)
        heapq.heappush(heap, (r + float(lengths[i]), j))
    # Branch and bound: no plan of these micro-batches and the rest is faster than the plans of those planned so
    # far, the bounds of the others (a re-planned one's: its sequences as one micro-batch) and the rest's bound;
    # the re-planning stops once that cannot beat `beat_s`
    new_ids = [np.concatenate([ids, np.asarray(extra, dtype=ids.dtype)]) if extra else None
               for ids, extra in zip(heads_ids, given)]
    bounds_s = [mb.estimated_s if ids is None else planner.layout_bound_ms(ids) / 1e3
                for ids, mb in zip(new_ids, head)]
    bound_s = sum(bounds_s) + (planner.bound_ms(left, frozenset(planner.degrees),
                                                fewest_micro_batches(planner.table, left)) / 1e3 if len(left) else 0)
    new_head = []
    for ids, mb, mb_bound_s in zip(new_ids, head, bounds_s):
        if bound_s >= beat_s:
            return None
        if ids is not None:
            mb = planner.micro_batch(ids)
            if mb is None:
                return None
            bound_s += mb.estimated_s - mb_bound_s
        new_head.append(mb)
    head_s = total_s(new_head)
    if head_s >= beat_s:
        return None
    # `runs` micro-batches are the spill's aim: one more than those (what the rest had) is not tried
    rest = (planner.best_split(left, REST_SPLITS, (beat_s - head_s) * 1e3, REST_FILL, one_more=False)
            if len(left) else [])
    return None if rest is None else new_head + rest
