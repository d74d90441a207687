"""The adaptive SP planner, a pure function: (sequence lengths, devices, cost model) -> plan.

1. Micro-batches ("sequence blaster"): the length-sorted sequences are cut into runs of about equal tokens,
   as many as the memory of all devices needs at the least. The leading runs of few sequences (SMALL_RUN: the
   long ones, on wide groups) are planned first and the boundaries between them moved, a sequence at a time,
   while that makes a pair faster. A few long sequences rarely balance their groups: the time those groups
   leave idle takes the longest other sequences that fit it. Only the sequences left are then split into
   the fewest runs their tokens need (a run per micro-batch), so short sequences, memory-bound, do not need a
   micro-batch of their own (b, ~4% of a step) for the few that would not fit beside the long runs; where
   they are a little over a whole number of runs, the excess joins the long runs, which are re-planned. A batch
   without long runs is split by work and by tokens, with more micro-batches where fewer cannot be laid out
   or one more may be faster; a split is abandoned once what it has planned plus the bounds of the rest
   cannot beat the best plan so far.
2. Per micro-batch, candidate layouts of power-of-two groups: every homogeneous degree that holds the
   longest sequence and, for each fill degree k, one group per sequence too long for k (at the degree it
   needs, or twice that) with the rest in k. Laid out largest first at consecutive offsets, every group is
   aligned and none straddles a node. Layouts are tried in order of a lower bound (the slowest sequence on
   its best group; all work spread evenly on the cheapest degrees), the homogeneous one of the lowest bound
   first, then MAX_LAYOUTS more, or more for a micro-batch of few sequences (LAYOUT_WORK: assigning costs
   about sequences x layouts).
3. Per layout: longest first, each sequence to the group where it finishes earliest (memory permitting;
   worst-fit by memory if that packs too tightly); the best result is refined by moves off the slowest group
   and, for micro-batches whose memory blocks every move, swaps. A group may hold no sequence (fewer
   sequences than devices): it runs on padding, since FSDP's collectives span every rank.
4. Static Ulysses's plan (every group of the smallest degree that holds the longest sequence), unless a bound
   shows it cannot be faster: the plan is never slower than static Ulysses.
Deterministic: stable sorts, no randomness, ties broken by position. trainers/parallel/adaptive/milp.py is
the exact reference it is measured against (bench/sp_planner.py).
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, replace

import numpy as np

from trainers.parallel.adaptive.cost import CostModel, degrees_up_to

LOCAL_SEARCH_MOVES = 64  # moves (or swaps) off the slowest group per micro-batch
SWAP_WORK = 2048  # swaps are tried (when no move helps) only while members of the slowest group x sequences is
# at most this: micro-batches of a few long sequences, where memory blocks moves; large ones balance by moves
SWAP_SEQUENCES = 100  # ... and in micro-batches of at most this many sequences (more gained nothing on the bench)
MAX_SWAPS = 8  # per layout polished; more gained under 1% in the bench's mixes
MAX_LAYOUTS = 1  # layouts assigned per micro-batch after the homogeneous one, in order of their lower bound
LAYOUT_WORK = 256  # ... or as many as keep sequences x layouts within this: a few long sequences, whose best
# layout (one group each, of the degree that balances them) the loose bounds of mixed layouts rank low
POLISHED = 1  # layouts, best first by their greedy result, that are refined (a second gained nothing)
SORTED_FILL = 0.97  # of the devices' memory a sorted run may take: room for the layout's rounding
REST_FILL = 0.99  # ... for the short sequences left after the long runs (see _Planner.mixed): they pack tightly
SMALL_RUN = 40 / 64  # runs of at most this many sequences per device are long ones (see _Planner.mixed)
SPILL_MOST = 0.5  # of a micro-batch's memory: a larger excess of the short sequences needs its micro-batch
BOUNDARY_PASSES = 2  # over the long runs' boundaries, each moving one sequence; a third or moving two gained <0.3%


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


def _fill(devices: int, degrees: list[int], fill: int) -> list[int]:
    """`degrees` while they fit, then groups of `fill`, then the remainder in the largest powers of two that
    fit; sorted descending, so laid out at consecutive offsets every group is aligned to its degree."""
    out, left = [], devices
    for d in degrees:
        if d <= left:
            out.append(d)
            left -= d
    while left:
        d = fill if fill <= left else 2 ** int(math.log2(left))
        out.append(d)
        left -= d
    return sorted(out, reverse=True)


@functools.lru_cache(maxsize=4096)  # pure; runs of short sequences need the same layouts, batch after batch
def _candidates(needs: tuple[int, ...], devices: int, degrees: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Layouts worth trying for one micro-batch, from the degree each of its longest sequences needs (`needs`,
    descending): every homogeneous degree that holds the longest sequence and, for every fill degree k, one
    group per sequence too long for k (at the degree it needs, 2x or 4x that: attention is quadratic, so a
    long sequence often runs faster on a wider group) with the rest in k."""
    layouts = [tuple(_fill(devices, [], d)) for d in degrees if d >= needs[0]]
    for k in degrees:
        longs = [d for d in needs if d > k] or [2 * k]  # no sequence needs more than k: one wider group
        for widen in (1, 2, 4):
            layouts.append(tuple(_fill(devices, [min(degrees[-1], d * widen) for d in longs], k)))
    return tuple(dict.fromkeys(layouts))


@dataclass
class _Assignment:
    """Sequences (indices into the micro-batch) on the groups of one layout, with each group's ms and room."""
    layout: list[int]
    members: list[list[int]]
    load: list[float]
    room: list[float]
    lens: list[int]
    t: dict[int, list[float]]

    @property
    def worst_ms(self) -> float:
        return max(self.load)

    def move(self, i: int, src: int, dst: int) -> None:
        self.members[src].remove(i)
        self.members[dst].append(i)
        self.load[src] -= self.t[self.layout[src]][i]
        self.load[dst] += self.t[self.layout[dst]][i]
        self.room[src] += self.lens[i]
        self.room[dst] -= self.lens[i]


def _assign(run: _Run, layout: tuple[int, ...], caps: dict[int, float], fixed: dict[int, float]) -> _Assignment | None:
    """None if the sequences do not fit. Longest first, each sequence to the group where it would finish
    earliest (memory permitting); groups of one degree are interchangeable, so only each degree's
    least-loaded group with room is a candidate (a heap per degree). If memory is too tight for that,
    worst-fit by memory instead; _refine balances the best afterwards. A group may be left without a
    sequence (the executor runs it on padding: FSDP's collectives need every rank in every micro-batch)."""
    load = [fixed[d] for d in layout]
    room = [caps[d] for d in layout]
    members: list[list[int]] = [[] for _ in layout]
    by_degree: dict[int, list[int]] = {}
    for g, d in enumerate(layout):
        by_degree.setdefault(d, []).append(g)
    heaps = {d: [(fixed[d], g) for g in gs] for d, gs in by_degree.items()}  # heaps already: equal loads, sorted g
    t = {d: run.ms[d] for d in by_degree}
    lens, order = run.lens, run.order
    classes = [(d, caps[d], heaps[d], t[d], by_degree[d]) for d in by_degree]
    heappop, heapreplace, heappush = heapq.heappop, heapq.heapreplace, heapq.heappush
    for i in order:  # the hot loop of planning: locals, no tuples per candidate
        size, best_finish, best_g, best_d, best_heap = lens[i], math.inf, -1, 0, None
        for d, cap, heap, t_d, groups in classes:
            if cap < size:
                continue
            top = heap[0]
            while top[0] != load[top[1]]:  # a stale entry: that group has taken a sequence since
                heappop(heap)
                top = heap[0]
            g = top[1]
            if room[g] < size:  # the least-loaded group of this degree is full: the least-loaded with room
                fits = [h for h in groups if room[h] >= size]
                if not fits:
                    continue
                g = min(fits, key=lambda h: (load[h], h))
            finish = load[g] + t_d[i]
            if finish < best_finish or (finish == best_finish and g < best_g):
                best_finish, best_g, best_d, best_heap = finish, g, d, heap
        if best_heap is None:  # packed too tightly for the greedy: place by memory alone, balance time after
            members = _place_by_memory(lens, order, layout, caps)
            if members is None:
                return None
            load = [fixed[d] + sum(t[d][i] for i in seqs) for d, seqs in zip(layout, members)]
            room = [caps[d] - sum(lens[i] for i in seqs) for d, seqs in zip(layout, members)]
            break
        members[best_g].append(i)
        load[best_g] = best_finish
        room[best_g] -= size
        if best_heap[0][1] == best_g:  # the group was its degree's top entry: replace it, leaving nothing stale
            heapreplace(best_heap, (best_finish, best_g))
        else:
            heappush(best_heap, (best_finish, best_g))

    return _Assignment(list(layout), members, load, room, lens, t)


def _refine(state: _Assignment, run: _Run, swaps: int) -> None:
    """Moves off the slowest group while one makes it faster; where memory blocks every move, up to `swaps`
    exchanges (micro-batches of few, long sequences). Each step weighs every member of the slowest group
    against every other group at once (a members x groups array)."""
    layout, members, lens = state.layout, state.members, state.lens
    lengths, per_group = run.lengths, run.here[[run.row[d] for d in layout]]  # (groups, sequences) ms
    loads, rooms = np.asarray(state.load), np.asarray(state.room)  # kept in step with the state's lists
    for _ in range(LOCAL_SEARCH_MOVES):
        worst = int(np.argmax(loads))  # the first maximum: the lowest group among equally slow ones
        if len(members[worst]) < 2:
            break
        mine = np.asarray(members[worst])
        after = per_group[:, mine].T + loads  # (members, groups): each group's load with that member added
        fits = rooms >= lengths[mine][:, None]
        fits[:, worst] = False
        new_max = np.where(fits, np.maximum(after, (loads[worst] - per_group[worst, mine])[:, None]), np.inf)
        a, g = np.unravel_index(int(np.argmin(new_max)), new_max.shape)  # first minimum: lowest member, group
        if new_max[a, g] < loads[worst] - 1e-9:
            state.move(int(mine[a]), worst, int(g))
        elif (swaps <= 0 or len(lens) > SWAP_SEQUENCES or len(members[worst]) * len(lens) > SWAP_WORK
              or not _swap(state, worst, lengths, per_group)):
            break
        else:
            swaps -= 1
        loads[:], rooms[:] = state.load, state.room


def _swap(state: _Assignment, worst: int, lengths: np.ndarray, per_group: np.ndarray) -> bool:
    """The best exchange of a sequence of the slowest group with one of another group; False if none makes
    the slower of the two groups faster than the slowest group is now."""
    owner = np.full(len(lengths), -1)
    for g, seqs in enumerate(state.members):
        owner[seqs] = g
    others = np.flatnonzero((owner != worst) & (owner >= 0))
    if len(others) == 0:
        return False
    group = owner[others]
    load, room = np.asarray(state.load), np.asarray(state.room)
    mine = np.asarray(state.members[worst])[:, None]  # (members of the slowest group, 1) against (others,)
    new_worst = load[worst] - per_group[worst, mine] + per_group[worst, others]
    new_other = load[group] - per_group[group, others] + per_group[group, mine]
    fits = (room[worst] + lengths[mine] - lengths[others] >= 0) & (room[group] + lengths[others] - lengths[mine] >= 0)
    new_max = np.where(fits, np.maximum(new_worst, new_other), np.inf)
    a, b = np.unravel_index(int(np.argmin(new_max)), new_max.shape)
    if not new_max[a, b] < load[worst] - 1e-9:
        return False
    i, j = int(mine[a, 0]), int(others[b])
    g = int(owner[j])
    state.move(i, worst, g)
    state.move(j, g, worst)
    return True


def _place_by_memory(lens: list[int], order: list[int], layout: list[int], caps: dict[int, float]):
    """Worst-fit decreasing: longest first, each sequence to the group with the most room left."""
    members: list[list[int]] = [[] for _ in layout]
    heap = [(-caps[d], g) for g, d in enumerate(layout)]
    heapq.heapify(heap)
    for i in order:
        free, g = heap[0]
        if -free < lens[i]:
            return None
        members[g].append(i)
        heapq.heapreplace(heap, (free + lens[i], g))
    return members


@dataclass
class _Run:
    """One micro-batch's sequences as the assignment reads them, computed once for all its layouts."""
    lengths: np.ndarray
    here: np.ndarray
    """Their ms on each degree, a row per degree (`row`)."""
    row: dict[int, int]
    lens: list[int]
    order: list[int]
    """Longest first."""
    ms: dict[int, list[float]]


def _micro_batch(lengths: np.ndarray, ids: np.ndarray, devices: int, here: np.ndarray, row: dict[int, int],
                 caps: dict[int, float], fixed: dict[int, float], options: list[tuple[float, tuple[int, ...], bool]]):
    """The best plan of one micro-batch: candidate layouts in order of their lower bound, stopping once no
    remaining layout can beat the best found. `here`: its sequences' ms, a row per degree (`row`)."""
    lens = lengths[ids]
    if lens.sum() > devices * caps[1]:  # every layout holds this many tokens: memory is linear in the degree
        return None
    run = _Run(lens, here, row, lens.tolist(), np.argsort(-lens, kind="stable").tolist(),
               {d: here[r].tolist() for d, r in row.items()})
    tried = []
    # The homogeneous layout of the lowest bound first (homogeneous bounds are tight, mixed ones loose: by bound
    # alone it can be cut off by MAX_LAYOUTS, and then a single degree beats the adaptive plan); then the rest
    # by lower bound. (Static Ulysses's layout needs no place here: its whole plan is the one to beat.)
    most = max(MAX_LAYOUTS, LAYOUT_WORK // len(ids))
    first = [o for o in options if o[2]][:1]
    for rank, (bound, layout, _) in enumerate(first + [o for o in options if o not in first]):
        beaten = not np.isfinite(bound) or (tried and bound >= min(tried)[0])
        if rank < len(first) and beaten:
            continue  # the first one is out of bound order: that it is beaten says nothing of the rest
        if beaten or len(tried) > most:
            break  # the rest are in bound order
        state = _assign(run, layout, caps, fixed)
        if state is not None:
            tried.append((state.worst_ms, len(tried), state))
    if not tried:
        return None
    # Refining costs more than assigning: only the best greedy results are refined (refining every layout
    # tried and keeping the best gained nothing on the bench)
    polished = [entry[2] for entry in sorted(tried)[:POLISHED]]
    for state in polished:
        _refine(state, run, swaps=MAX_SWAPS)
    best = min(polished, key=lambda st: st.worst_ms)
    layout, members, load, worst = best.layout, best.members, best.load, best.worst_ms
    groups, first_rank = [], 0
    for d, seqs, ms in zip(layout, members, load):
        groups.append(Group(d, tuple(range(first_rank, first_rank + d)), tuple(sorted(int(ids[i]) for i in seqs)),
                            ms / 1e3))
        first_rank += d
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


@dataclass(frozen=True)
class _Batch:
    """What the splits know of the batch's sequences."""
    lengths: np.ndarray
    needs: np.ndarray
    """The smallest degree that holds each sequence."""
    work: np.ndarray
    """Device-ms of each sequence on its cheapest degree (d x its time on a group of d)."""
    devices: int
    capacity: float
    """Tokens all devices hold in one micro-batch."""
    fill: float = SORTED_FILL
    """Of `capacity`, what a sorted run may take: room for the layout's rounding."""

    def __getitem__(self, ids: np.ndarray) -> _Batch:
        return _Batch(self.lengths[ids], self.needs[ids], self.work[ids], self.devices, self.capacity, self.fill)


def _balanced_split(batch: _Batch, m: int) -> list[np.ndarray]:
    """m micro-batches of about equal tokens: longest first, each to the one holding the fewest tokens."""
    bins: list[list[int]] = [[] for _ in range(m)]
    heap = [(0, b) for b in range(m)]
    for i in np.argsort(-batch.lengths, kind="stable").tolist():
        tokens, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (tokens + int(batch.lengths[i]), b))
    return [np.asarray(ids) for ids in bins if ids]


def _sorted_split(batch: _Batch, m: int) -> list[np.ndarray]:
    """Runs of the length-sorted sequences of about an equal share of the work left each: long sequences
    together (wide groups for all of them), short ones together (narrow groups, cheap all-to-alls). Balanced
    by work, not tokens: a token of a long sequence costs more (attention is quadratic, wide all-to-alls
    slow). A run also closes at `fill` of the devices' memory, and before the groups its sequences need
    at the least (those needing more than one device) would pass the devices; the share is then of what is
    left over the runs left, so one long sequence worth more than 1/m of the work does not push the short
    tail into a run of its own. There may still be more than m runs."""
    order = np.argsort(-batch.lengths, kind="stable")
    lengths, work = batch.lengths[order], batch.work[order]
    wide = np.where(batch.needs[order] > 1, batch.needs[order], 0)  # devices the run's groups need at the least
    left = float(batch.work.sum())
    target = left / m
    parts, start = [], 0
    while start < len(order):
        # A run closes before the first sequence that would pass a limit (a run takes at least one); cumulative
        # sums from the run's start add in the same order as a running total would
        done = np.cumsum(work[start:])
        over = ((done > target * (1 + 1e-9)) | (np.cumsum(lengths[start:]) > batch.capacity * batch.fill)
                | (np.cumsum(wide[start:]) > batch.devices))
        over[0] = False
        end = start + (int(np.argmax(over)) if over.any() else len(over))
        parts.append(order[start:end])
        left -= float(done[end - start - 1])
        target = left / max(1, m - len(parts))
        start = end
    return parts


def _sorted_split_by_tokens(batch: _Batch, m: int) -> list[np.ndarray]:
    """As _sorted_split, with runs of about 1/m of the tokens (memory-bound batches pack tighter this way)."""
    return _sorted_split(replace(batch, work=batch.lengths.astype(float)), m)


SPLITS = (_balanced_split, _sorted_split, _sorted_split_by_tokens)
MIXED_SPLITS = SPLITS[1:]  # balanced won 1 of 100 heavy-tailed batches on 64 devices (by 0.3%) when all split so
REST_SPLITS = (_sorted_split_by_tokens,)  # short sequences: by work as good, to 0.1%, at twice the cost


def _total(mbs) -> float:
    return sum(mb.estimated_s for mb in mbs)


class _Planner:
    """One plan's shared state: every sequence's time on every degree, computed once, and every micro-batch
    planned so far (keyed by its sequences: splits, passes and cuts below share many)."""

    def __init__(self, lengths: np.ndarray, devices: int, cost: CostModel, degree: int | None):
        self.lengths, self.devices, self.degree = lengths, devices, degree
        static_degree(lengths, devices, cost)  # refuses what no group holds
        caps = {d: cost.max_tokens(d, devices) for d in degrees_up_to(devices)}
        if degree is not None:
            caps = {d: c for d, c in caps.items() if d <= degree}  # a homogeneous plan's remainder groups are smaller
        self.caps, self.degrees = caps, sorted(caps)
        self.row = {d: r for r, d in enumerate(self.degrees)}
        self.fixed = {d: cost.fixed_ms(d) for d in caps}
        self.matrix = np.stack([np.asarray(cost.sequence_ms(lengths.astype(float), d), dtype=float)
                                for d in self.degrees])  # (degrees, sequences) ms
        fits = lengths[None, :] <= np.asarray([caps[d] for d in self.degrees])[:, None]
        self.on = np.where(fits, self.matrix, np.inf)
        needs = np.asarray(self.degrees)[np.minimum(
            np.searchsorted([caps[d] for d in self.degrees], lengths, side="left"), len(caps) - 1)]
        self.dev_ms = self.on * np.asarray(self.degrees, dtype=float)[:, None]  # device-ms, inf where it does not fit
        self.batch = _Batch(lengths, needs, self.dev_ms.min(axis=0), devices, caps[1] * devices)
        self.cheapest_fixed = min(self.fixed.values())
        self.homogeneous = {tuple(_fill(devices, [], d)) for d in self.degrees}
        self._options: dict[bytes, list] = {}
        self._over: dict[frozenset, tuple[np.ndarray, np.ndarray]] = {}
        self._planned: dict[bytes, MicroBatch | None] = {}
        self._by_lengths: dict[bytes, tuple[np.ndarray, MicroBatch | None]] = {}

    def options(self, ids: np.ndarray) -> list[tuple[float, tuple[int, ...], bool]]:
        """A micro-batch's candidate layouts with their lower bounds, most promising first, and whether each
        is homogeneous."""
        key = np.sort(self.lengths[ids]).tobytes()  # layouts and bounds depend on the lengths alone
        if key not in self._options:
            if self.degree is not None:
                layouts = (tuple(_fill(self.devices, [], self.degree)),)
            else:
                needs = tuple(np.sort(self.batch.needs[ids])[::-1][:self.devices].tolist())
                layouts = _candidates(needs, self.devices, tuple(self.degrees))
            bounds = self._lower_bounds(layouts, ids)
            self._options[key] = sorted(zip(bounds, layouts, [layout in self.homogeneous for layout in layouts]),
                                        key=lambda p: p[0])
        return self._options[key]

    def _lower_bounds(self, layouts: tuple[tuple[int, ...], ...], ids: np.ndarray) -> list[float]:
        """No assignment of the sequences `ids` onto a layout is faster: the slowest sequence on its best group,
        and all the work spread evenly over the devices, each on the degree that does it in the fewest
        device-milliseconds. Both depend only on the layout's set of degrees."""
        by_set: dict[frozenset, float] = {}
        out = []
        for layout in layouts:
            key = frozenset(layout)
            if key not in by_set:
                fastest_ms, least_dev_ms = self._best_over(key)
                fastest = float(fastest_ms[ids].max())
                by_set[key] = np.inf if not math.isfinite(fastest) else (
                    min(self.fixed[d] for d in key) + max(fastest, float(least_dev_ms[ids].sum()) / self.devices))
            out.append(by_set[key])
        return out

    def _best_over(self, degrees: frozenset) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's ms on the fastest of `degrees` and device-ms on the cheapest (inf where none holds
        it), once per set per plan: every micro-batch's layouts draw on the same few sets."""
        if degrees not in self._over:
            rows = [self.row[d] for d in degrees]
            self._over[degrees] = self.on[rows].min(axis=0), self.dev_ms[rows].min(axis=0)
        return self._over[degrees]

    def micro_batch(self, ids: np.ndarray) -> MicroBatch | None:
        """The plan of a micro-batch of the sequences `ids`, planned once per multiset of lengths: a long
        document cut into many chunks of the longest length makes as many micro-batches of one chunk each."""
        key = np.sort(ids).tobytes()
        if key not in self._planned:
            ordered = ids[np.lexsort((ids, self.lengths[ids]))]  # shortest first, ties by index
            by_length = self.lengths[ordered].tobytes()
            if by_length not in self._by_lengths:
                self._by_lengths[by_length] = ordered, _micro_batch(
                    self.lengths, ordered, self.devices, self.matrix[:, ordered], self.row, self.caps, self.fixed,
                    self.options(ordered))
            planned_for, mb = self._by_lengths[by_length]
            if mb is not None and planned_for is not ordered:  # the same lengths at other indices
                to = dict(zip(planned_for.tolist(), ordered.tolist()))
                mb = replace(mb, groups=tuple(replace(g, sequences=tuple(sorted(to[i] for i in g.sequences)))
                                              for g in mb.groups))
            self._planned[key] = mb
        return self._planned[key]

    def fewest(self, pool: np.ndarray) -> int:
        """The fewest micro-batches the memory allows: by tokens, and by the sequences only the widest groups
        hold (a micro-batch has devices // widest such groups, each holding as many of them as fit its
        memory, the shortest first: at most that many). A long document cut into many chunks of the longest
        length otherwise sends the search through dozens of infeasible counts."""
        lengths, capacity = self.lengths[pool], self.batch.capacity
        fewest = max(1, math.ceil(lengths.sum() / capacity)) if capacity > 0 else 1
        widest = max(self.caps)
        longest_ones = np.sort(lengths[self.batch.needs[pool] == widest])
        if len(longest_ones):
            per_group = max(1, int(np.searchsorted(np.cumsum(longest_ones), self.caps[widest], side="right")))
            fewest = max(fewest, math.ceil(len(longest_ones) / (per_group * (self.devices // widest))))
        return fewest

    def homogeneous_bound_ms(self, degree: int) -> float:
        """No plan of groups of `degree` alone is faster: the fewest micro-batches' fixed cost plus all work
        spread evenly over the devices, each sequence on the cheapest degree of that layout, or the slowest
        sequence on its best group; for a degree that holds every sequence (static Ulysses's). That is mostly
        far slower than the mixed plan: this spares its search then."""
        degrees = frozenset(_fill(self.devices, [], degree))
        fixed = min(self.fixed[d] for d in degrees)
        fastest_ms, least_dev_ms = self._best_over(degrees)
        work, slowest = float(least_dev_ms.sum()), float(fastest_ms.max())
        return max(self.fewest(np.arange(len(self.lengths))) * fixed + work / self.devices, fixed + slowest)

    def search(self, pool: np.ndarray, splits, budget_ms: float, fill: float = SORTED_FILL) -> list[MicroBatch] | None:
        """The sequences `pool` in the fewest micro-batches that fit, split each way in `splits`; the fastest
        under `budget_ms`, or None. Branch and bound: the split of the lowest bound first (the layouts' bounds),
        and a split stops as soon as what it has planned plus the bounds of what is left cannot beat the best."""
        sub = replace(self.batch[pool], fill=fill)
        fewest = self.fewest(pool)
        spread_ms = float(sub.work.sum()) / self.devices  # all work on each sequence's cheapest degree, spread evenly
        best, best_ms = None, budget_ms
        ordered = []
        for split in splits:
            parts = [pool[p] for p in split(sub, fewest)]
            options = [self.options(ids) for ids in parts]
            ordered.append((sum(o[0][0] for o in options), split, parts, options))
        for _, split, parts, options in sorted(ordered, key=lambda entry: entry[0]):
            m, first_fit = fewest, None
            while m <= len(pool):
                if m > fewest:
                    parts = [pool[p] for p in split(sub, m)]
                    options = [self.options(ids) for ids in parts]
                micro, outcome = [], "planned"
                remaining = sum(o[0][0] for o in options)
                for ids, opts in zip(parts, options):
                    if _total(micro) * 1e3 + remaining >= best_ms:
                        outcome = "beaten"
                        break
                    mb = self.micro_batch(ids)
                    if mb is None:
                        outcome = "infeasible"
                        break
                    micro.append(mb)
                    remaining -= opts[0][0]
                if outcome != "infeasible" and first_fit is None:
                    first_fit = m
                if outcome == "infeasible":
                    m += max(1, m // 16)  # many micro-batches: step faster (one more micro-batch is b in ~m)
                    continue
                if outcome == "planned" and _total(micro) * 1e3 < best_ms:
                    best, best_ms = micro, _total(micro) * 1e3
                # One more micro-batch than the fewest that fit can be faster: packed less tightly, sequences
                # need narrower groups, a gain where wide groups cost more per device (a profile of slow links).
                # Tried once per split, while its bound can beat the best plan.
                if m == first_fit and m < len(pool) and (m + 1) * self.cheapest_fixed + spread_ms < best_ms:
                    m += 1
                    continue
                break
        return best

    def mixed(self) -> list[MicroBatch] | None:
        """Micro-batches of mixed degrees. The batch is first cut into runs of the length-sorted sequences (by
        tokens); the leading runs of few sequences (long ones, on wide groups) are planned first, the boundaries
        between them moved while that helps, and the time their groups leave idle (a few long sequences rarely
        balance their groups) filled with the longest of the other sequences that fit. Only those left are then
        split into the fewest micro-batches that hold them: short sequences, memory-bound, no longer need a
        micro-batch of their own for the few that do not fit beside the long runs, which costs b. A batch
        without long runs is split each way in MIXED_SPLITS."""
        everything = np.arange(len(self.lengths))
        runs = _sorted_split_by_tokens(self.batch, self.fewest(everything))
        n_long = 0
        while n_long < len(runs) and len(runs[n_long]) <= SMALL_RUN * self.devices:
            n_long += 1
        if n_long:
            runs = [r[np.lexsort((r, -self.lengths[r]))] for r in runs]  # longest first: the ends are the boundaries
            self._shift_boundaries(runs, n_long)
            long_mbs = [self.micro_batch(r) for r in runs[:n_long]]
            if all(mb is not None for mb in long_mbs):
                head, pool = _fill_idle(long_mbs, np.concatenate([everything[:0]] + runs[n_long:]), self)
                rest = self.search(pool, REST_SPLITS, np.inf, REST_FILL) if len(pool) else []
                if rest is not None:
                    return self._spill(head, pool, _total(head) + _total(rest)) or head + rest
        return self.search(everything, MIXED_SPLITS, np.inf)

    def _spill(self, head: list[MicroBatch], pool: np.ndarray, total_s: float) -> list[MicroBatch] | None:
        """The short sequences a little over a whole number of micro-batches cost one more (b, and a layout
        packed for few): their shortest, as many tokens as that excess, go to the long runs with the most
        memory left, which are re-planned (a run of a few long sequences and some short ones is often laid out
        better than the long ones alone in the idle time _fill_idle found). The plan if it is faster than
        `total_s`, else None."""
        if not len(pool):
            return None
        tokens, per_run = float(self.lengths[pool].sum()), self.batch.capacity * REST_FILL
        excess = tokens - (math.ceil(tokens / per_run) - 1) * per_run
        if excess > SPILL_MOST * self.batch.capacity:
            return None
        heads_ids = [np.asarray(sorted(i for g in mb.groups for i in g.sequences)) for mb in head]
        room = [self.batch.capacity * SORTED_FILL - float(self.lengths[ids].sum()) for ids in heads_ids]
        if sum(max(0.0, r) for r in room) < excess:
            return None
        order = pool[np.argsort(self.lengths[pool], kind="stable")]
        n = int(np.searchsorted(np.cumsum(self.lengths[order]), excess, side="left")) + 1
        moved, left = order[:n], order[n:]
        given: list[list[int]] = [[] for _ in head]
        heap = [(-r, j) for j, r in enumerate(room)]  # each to the run with the most memory left
        heapq.heapify(heap)
        for i in moved.tolist():
            r, j = heapq.heappop(heap)
            given[j].append(i)
            heapq.heappush(heap, (r + float(self.lengths[i]), j))
        new_head = []
        for ids, mb, extra in zip(heads_ids, head, given):
            if extra:
                mb = self.micro_batch(np.concatenate([ids, np.asarray(extra, dtype=ids.dtype)]))
                if mb is None:
                    return None
            new_head.append(mb)
        head_s = _total(new_head)
        if head_s >= total_s:
            return None
        rest = self.search(left, REST_SPLITS, (total_s - head_s) * 1e3, REST_FILL) if len(left) else []
        return None if rest is None else new_head + rest

    def _shift_boundaries(self, runs: list[np.ndarray], n_long: int) -> None:
        """Moves a sequence across the boundary of each pair of the first `n_long` runs (the shortest of the
        one to the next, or the longest of the next to the one) while that makes the pair faster: a long
        sequence that shares a wide group may run better on its own group in the next micro-batch, and the
        reverse. A move whose micro-batches' bounds cannot beat the pair is not planned."""
        def bound_s(ids):
            return self.options(ids)[0][0] / 1e3

        def pair_s(a, b, beat: float) -> float:
            """The pair's estimate, or inf once it cannot be under `beat`: the second run is not planned
            when the first's plan and the second's bound already reach it (planning is most of the cost)."""
            x = self.micro_batch(a)
            if x is None or x.estimated_s + bound_s(b) >= beat:
                return np.inf
            y = self.micro_batch(b)
            return np.inf if y is None else x.estimated_s + y.estimated_s

        for _ in range(BOUNDARY_PASSES):
            moved = False
            for r in range(n_long - 1):
                a, b = runs[r], runs[r + 1]
                moves = [(a[:-1], np.concatenate([a[-1:], b]))] if len(a) > 1 else []
                moves += [(np.concatenate([a, b[:1]]), b[1:])] if len(b) > 1 else []
                if not moves:
                    continue
                now = pair_s(a, b, np.inf)
                # The fastest move under now (ties: the first), each move planned only while its bound can beat
                # the best so far
                best_s, pick = now - 1e-12, None
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


def _fill_idle(mbs: list[MicroBatch], pool: np.ndarray, planner: _Planner) -> tuple[list[MicroBatch], np.ndarray]:
    """The groups of `mbs` that finish before their micro-batch's slowest take sequences of `pool` while they
    finish no later and memory holds them: the longest that fits each time (first-fit decreasing packs the
    idle time tighter than shortest first, 0.3% on the bench), groups with the most idle time first. Returns
    the micro-batches and what is left of the pool. A group's time and memory are sums over its sequences, so
    this is exact: no micro-batch gets slower."""
    lengths = planner.lengths
    pool = pool[np.argsort(lengths[pool], kind="stable")]
    idle = sorted((g.estimated_s - mb.estimated_s, j, k) for j, mb in enumerate(mbs) for k, g in enumerate(mb.groups)
                  if g.estimated_s < mb.estimated_s)
    added: dict[tuple[int, int], np.ndarray] = {}
    for minus_idle, j, k in idle:
        g = mbs[j].groups[k]
        slack, room = -minus_idle * 1e3, planner.caps[g.degree] - float(lengths[list(g.sequences)].sum())
        t, size = planner.matrix[planner.row[g.degree], pool], lengths[pool]
        taken = np.zeros(len(pool), dtype=bool)
        while True:
            fits = np.flatnonzero(~taken & (t <= slack) & (size <= room))
            if not len(fits):
                break
            q = fits[-1]  # the pool is shortest first
            taken[q] = True
            slack, room = slack - t[q], room - size[q]
        if taken.any():
            added[(j, k)] = pool[taken]
            pool = pool[~taken]
    out = []
    for j, mb in enumerate(mbs):
        groups = list(mb.groups)
        for k, g in enumerate(groups):
            if (j, k) in added:
                seqs = np.concatenate([np.asarray(g.sequences, dtype=np.int64), added[(j, k)]])
                ms = planner.fixed[g.degree] + float(planner.matrix[planner.row[g.degree], seqs].sum())
                groups[k] = Group(g.degree, g.ranks, tuple(sorted(seqs.tolist())), ms / 1e3)
        out.append(MicroBatch(tuple(groups), max(g.estimated_s for g in groups)))
    return out, pool


def _plan(lengths, devices: int, cost: CostModel, degree: int) -> SPPlan:
    """Every group of `degree`: the fewest micro-batches that fit, split each way in SPLITS."""
    lengths = _check(lengths, devices, cost)
    mbs = _Planner(lengths, devices, cost, degree).search(np.arange(len(lengths)), SPLITS, np.inf)
    if mbs is None:
        raise InfeasibleError(f"no layout of degree {degree} holds these sequences on {devices} devices")
    return SPPlan(devices, tuple(mbs), _total(mbs))


def plan_adaptive(lengths, devices: int, cost: CostModel) -> SPPlan:
    """Groups of mixed degrees per micro-batch, never slower than static Ulysses: the number of micro-batches
    is searched only near the fewest that fit, and where wide groups cost far more per device than narrow ones
    (slow links) static's own, larger number can win by far (0.6x on the profiled CPU model). So static's plan
    is made too, after the mixed one, unless a bound says it cannot be faster (mostly it is far slower)."""
    lengths = _check(lengths, devices, cost)
    planner = _Planner(lengths, devices, cost, None)
    mbs = planner.mixed()
    if mbs is None:
        raise InfeasibleError(f"no layout holds these sequences on {devices} devices")
    mixed = SPPlan(devices, tuple(mbs), _total(mbs))
    static = static_degree(lengths, devices, cost)
    if planner.homogeneous_bound_ms(static) >= mixed.estimated_s * 1e3:
        return mixed
    static_mbs = _Planner(lengths, devices, cost, static).search(np.arange(len(lengths)), SPLITS,
                                                                 mixed.estimated_s * 1e3)
    return mixed if static_mbs is None else SPPlan(devices, tuple(static_mbs), _total(static_mbs))


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
