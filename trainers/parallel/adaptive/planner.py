"""The adaptive SP planner, a pure function: (sequence lengths, devices, cost model) -> plan.

1. Micro-batches ("sequence blaster"): the fewest that fit, starting from the token bound
   ceil(total / capacity of all devices), split three ways: balanced (longest first to the micro-batch with
   the fewest tokens) and sorted, by work or by tokens (runs of the length-sorted sequences, so long
   sequences share a micro-batch of wide groups and short ones one of narrow groups). If a micro-batch
   cannot be laid out, more are tried. The fastest plan wins; a split is abandoned once what it has planned
   plus the bounds of the rest cannot beat the best plan so far.
2. Per micro-batch, candidate layouts of power-of-two groups: every homogeneous degree that holds the
   longest sequence and, for each fill degree k, one group per sequence too long for k (at the degree it
   needs, 2x or 4x) with the rest in k. Laid out largest first at consecutive offsets, every group is aligned
   and none straddles a node. Layouts are tried in order of a lower bound (the slowest sequence on its best
   group; all work spread evenly on the cheapest degrees), at most MAX_LAYOUTS of them, or more for a
   micro-batch of few sequences (LAYOUT_WORK: assigning costs about sequences x layouts).
3. Per layout: longest first, each sequence to the group where it finishes earliest (memory permitting;
   worst-fit by memory if that packs too tightly), then moves off the slowest group; the best POLISHED
   layouts also get swaps, for micro-batches whose memory blocks every move. A group may hold no sequence
   (fewer sequences than devices): it runs on padding, since FSDP's collectives span every rank.
Deterministic: stable sorts, no randomness, ties broken by position. trainers/parallel/adaptive/milp.py is
the exact reference it is measured against (bench/sp_planner.py).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace

import numpy as np

from trainers.parallel.adaptive.cost import CostModel, degrees_up_to

LOCAL_SEARCH_MOVES = 64  # moves (or swaps) off the slowest group per micro-batch
SWAP_WORK = 2048  # swaps are tried (when no move helps) only while members of the slowest group x sequences is
# at most this: micro-batches of a few long sequences, where memory blocks moves; large ones balance by moves
MAX_SWAPS = 8  # per layout polished; more gained under 1% in the bench's mixes
MAX_LAYOUTS = 3  # layouts assigned per micro-batch, in order of their lower bound
LAYOUT_WORK = 256  # ... or as many as keep sequences x layouts within this: a few long sequences, whose best
# layout (one group each, of the degree that balances them) the loose bounds of mixed layouts rank low
SORTED_FILL = 0.97  # of the devices' memory a sorted run may take: room for the layout's rounding
POLISHED = 2  # layouts, best first by their greedy result, that are refined with swaps


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


def _candidates(lengths: np.ndarray, devices: int, caps: dict[int, float], degree: int | None) -> list[list[int]]:
    """Layouts worth trying for one micro-batch: every homogeneous degree that holds the longest sequence and,
    for every fill degree k, one group per sequence too long for k (at the degree it needs, or 2x or 4x that:
    attention is quadratic, so a long sequence often runs faster on a wider group) with the rest in k."""
    if degree is not None:
        return [_fill(devices, [], degree)]
    degrees = sorted(caps)
    bounds = np.array([caps[d] for d in degrees])
    ordered = np.sort(lengths)[::-1][:devices]
    needs = [degrees[j] for j in np.searchsorted(bounds, ordered, side="left").tolist()]  # degree each needs
    layouts = [_fill(devices, [], d) for d in degrees if d >= needs[0]]
    for k in degrees:
        longs = [d for d in needs if d > k] or [2 * k]  # no sequence needs more than k: one wider group
        for widen in (1, 2, 4):
            layouts.append(_fill(devices, [min(degrees[-1], d * widen) for d in longs], k))
    unique = []
    for layout in layouts:
        if layout not in unique:
            unique.append(layout)
    return unique


def _lower_bounds(layouts: list[list[int]], times: dict[int, np.ndarray], lengths: np.ndarray,
                  caps: dict[int, float], devices: int, fixed: dict[int, float]) -> list[float]:
    """No assignment onto a layout is faster: the slowest sequence on its best group, and all the work
    spread evenly over the devices, each on the degree that does it in the fewest device-milliseconds.
    Both depend only on the layout's set of degrees, so each set is computed once."""
    on = {d: np.where(lengths <= caps[d], times[d], np.inf) for d in caps}
    by_set: dict[tuple[int, ...], float] = {}
    out = []
    for layout in layouts:
        degrees = tuple(sorted(set(layout)))
        if degrees not in by_set:
            fastest = np.minimum.reduce([on[d] for d in degrees])
            if not np.isfinite(fastest).all():
                by_set[degrees] = np.inf
            else:
                cheapest = np.minimum.reduce([on[d] * d for d in degrees])
                by_set[degrees] = min(fixed[d] for d in degrees) + max(float(fastest.max()), float(cheapest.sum()) / devices)
        out.append(by_set[degrees])
    return out


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


def _assign(lengths: np.ndarray, layout: list[int], times: dict[int, np.ndarray], caps: dict[int, float],
            fixed: dict[int, float]) -> _Assignment | None:
    """None if the sequences do not fit. Longest first, each sequence to the group where it would finish
    earliest (memory permitting); groups of one degree are interchangeable, so only each degree's
    least-loaded group with room is a candidate (a heap per degree). If memory is too tight for that,
    worst-fit by memory instead. Then bounded moves off the slowest group. A group may be left without a
    sequence (the executor runs it on padding: FSDP's collectives need every rank in every micro-batch)."""
    n_groups = len(layout)
    load = [fixed[d] for d in layout]
    room = [caps[d] for d in layout]
    members: list[list[int]] = [[] for _ in layout]
    by_degree: dict[int, list[int]] = {}
    for g, d in enumerate(layout):
        by_degree.setdefault(d, []).append(g)
    heaps = {d: [(fixed[d], g) for g in gs] for d, gs in by_degree.items()}  # heaps already: equal loads, sorted g
    t = {d: times[d].tolist() for d in by_degree}
    lens = lengths.tolist()
    order = np.argsort(-lengths, kind="stable").tolist()

    classes = [(d, caps[d], heaps[d], t[d], by_degree[d]) for d in by_degree]
    for i in order:
        size, best = lens[i], None
        for d, cap, heap, t_d, groups in classes:
            if cap < size:
                continue
            while heap[0][0] != load[heap[0][1]]:  # a stale entry: that group has taken a sequence since
                heapq.heappop(heap)
            g = heap[0][1]
            if room[g] < size:  # the least-loaded group of this degree is full: the least-loaded with room
                fits = [h for h in groups if room[h] >= size]
                if not fits:
                    continue
                g = min(fits, key=lambda h: (load[h], h))
            finish = load[g] + t_d[i]
            if best is None or finish < best[0] or (finish == best[0] and g < best[1]):
                best = (finish, g, d)
        if best is None:  # packed too tightly for the greedy: place by memory alone, balance time after
            members = _place_by_memory(lens, order, layout, caps)
            if members is None:
                return None
            load = [fixed[d] + sum(t[d][i] for i in seqs) for d, seqs in zip(layout, members)]
            room = [caps[d] - sum(lens[i] for i in seqs) for d, seqs in zip(layout, members)]
            break
        finish, g, d = best
        members[g].append(i)
        load[g] = finish
        room[g] -= size
        heapq.heappush(heaps[d], (finish, g))

    state = _Assignment(layout, members, load, room, lens, t)
    _refine(state, lengths, times, swaps=0)
    return state


def _refine(state: _Assignment, lengths: np.ndarray, times: dict[int, np.ndarray], swaps: int) -> None:
    """Moves off the slowest group while one makes it faster; where memory blocks every move, up to `swaps`
    exchanges (micro-batches of few, long sequences). Each step weighs every member of the slowest group
    against every other group at once (a members x groups array)."""
    layout, members, load, room, lens = state.layout, state.members, state.load, state.room, state.lens
    per_group = np.stack([times[d] for d in layout])  # (groups, sequences) ms
    for _ in range(LOCAL_SEARCH_MOVES):
        worst = max(range(len(layout)), key=lambda g: (load[g], -g))
        if len(members[worst]) < 2:
            break
        mine = np.asarray(members[worst])
        loads, rooms = np.asarray(load), np.asarray(room)
        after = per_group[:, mine].T + loads  # (members, groups): each group's load with that member added
        fits = rooms >= lengths[mine][:, None]
        fits[:, worst] = False
        new_max = np.where(fits, np.maximum(after, (load[worst] - per_group[worst, mine])[:, None]), np.inf)
        a, g = np.unravel_index(int(np.argmin(new_max)), new_max.shape)  # first minimum: lowest member, group
        if new_max[a, g] < load[worst] - 1e-9:
            state.move(int(mine[a]), worst, int(g))
        elif swaps <= 0 or len(members[worst]) * len(lens) > SWAP_WORK or not _swap(state, worst, lengths, per_group):
            break
        else:
            swaps -= 1


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


def _options(lengths: np.ndarray, ids: np.ndarray, devices: int, cost: CostModel, caps: dict[int, float],
             times: dict[int, np.ndarray], degree: int | None) -> list[tuple[float, list[int]]]:
    """A micro-batch's candidate layouts with their lower bounds, most promising first."""
    lens = lengths[ids]
    here = {d: times[d][ids] for d in caps}
    layouts = _candidates(lens, devices, caps, degree)
    bounds = _lower_bounds(layouts, here, lens, caps, devices, {d: cost.fixed_ms(d) for d in caps})
    return sorted(zip(bounds, layouts), key=lambda p: p[0])


def _micro_batch(lengths: np.ndarray, ids: np.ndarray, devices: int, cost: CostModel, caps: dict[int, float],
                 times: dict[int, np.ndarray], options: list[tuple[float, list[int]]], degree: int | None,
                 static: int):
    """The best plan of one micro-batch: candidate layouts in order of their lower bound, stopping once no
    remaining layout can beat the best found."""
    lens = lengths[ids]
    here = {d: times[d][ids] for d in caps}
    fixed = {d: cost.fixed_ms(d) for d in caps}
    tried = []
    # The static layout first, so the plan is never slower than static Ulysses; then the homogeneous layout of
    # the lowest bound (homogeneous bounds are tight, mixed ones loose: by bound alone it can be cut off by
    # MAX_LAYOUTS, and then a single degree beats the adaptive plan); then the rest by lower bound.
    most = max(MAX_LAYOUTS, LAYOUT_WORK // len(ids))
    first = [o for o in options if o[1] == _fill(devices, [], static)]
    first += [o for o in options if o[1] == _fill(devices, [], o[1][0]) and o not in first][:1]
    for rank, (bound, layout) in enumerate(first + [o for o in options if o not in first]):
        beaten = not np.isfinite(bound) or (tried and bound >= min(tried)[0])
        if rank < len(first) and beaten:
            continue  # the first ones are out of bound order: one beaten says nothing of the rest
        if beaten or len(tried) > most:
            break  # the rest are in bound order
        state = _assign(lens, layout, here, caps, fixed)
        if state is not None:
            tried.append((state.worst_ms, len(tried), state))
    if not tried:
        return None
    polished = [entry[2] for entry in sorted(tried)[:POLISHED]]  # swaps only where they may matter: they cost most
    for state in polished:
        _refine(state, lens, here, swaps=MAX_SWAPS)
    best = min(polished, key=lambda st: st.worst_ms)
    layout, members, load, worst = best.layout, best.members, best.load, best.worst_ms
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
    """Runs of the length-sorted sequences of about 1/m of the work each: long sequences together (wide
    groups for all of them), short ones together (narrow groups, cheap all-to-alls). Balanced by work, not
    tokens: a token of a long sequence costs more (attention is quadratic, wide all-to-alls slow). A run also
    closes at SORTED_FILL of the devices' memory, and before the groups its sequences need at the least
    (those needing more than one device) would pass the devices; so there may be more than m runs."""
    order = np.argsort(-batch.lengths, kind="stable").tolist()
    lengths, needs, work = batch.lengths.tolist(), batch.needs.tolist(), batch.work.tolist()  # Python scalars: fast
    target = sum(work) / m
    parts, current, done, tokens, wide = [], [], 0.0, 0.0, 0
    for i in order:
        need = needs[i] if needs[i] > 1 else 0
        if current and (done + work[i] > target * (1 + 1e-9) or tokens + lengths[i] > batch.capacity * SORTED_FILL
                        or wide + need > batch.devices):
            parts.append(np.asarray(current))
            current, done, tokens, wide = [], 0.0, 0.0, 0
        current.append(i)
        done += work[i]
        tokens += lengths[i]
        wide += need
    parts.append(np.asarray(current))
    return parts


def _sorted_split_by_tokens(batch: _Batch, m: int) -> list[np.ndarray]:
    """As _sorted_split, with runs of about 1/m of the tokens (memory-bound batches pack tighter this way)."""
    return _sorted_split(replace(batch, work=batch.lengths.astype(float)), m)


SPLITS = (_balanced_split, _sorted_split, _sorted_split_by_tokens)


def _plan(lengths, devices: int, cost: CostModel, degree: int | None, incumbent: SPPlan | None = None) -> SPPlan:
    """The fewest micro-batches that fit, split each way in SPLITS; the faster plan wins, `incumbent` (a plan
    to beat, which prunes the search from the start) included."""
    lengths = _check(lengths, devices, cost)
    static = static_degree(lengths, devices, cost)  # refuses what no group holds
    caps = {d: cost.max_tokens(d, devices) for d in degrees_up_to(devices)}
    if degree is not None:
        caps = {d: c for d, c in caps.items() if d <= degree}  # a homogeneous plan's remainder groups are smaller
    times = {d: np.asarray(cost.sequence_ms(lengths.astype(float), d), dtype=float) for d in caps}
    degrees = sorted(caps)
    needs = np.asarray(degrees)[np.minimum(np.searchsorted([caps[d] for d in degrees], lengths, side="left"),
                                           len(degrees) - 1)]
    work = np.minimum.reduce([np.where(lengths <= caps[d], d * times[d], np.inf) for d in degrees])
    capacity = caps[1] * devices
    batch = _Batch(lengths, needs, work, devices, capacity)
    fewest = max(1, math.ceil(lengths.sum() / capacity)) if capacity > 0 else 1
    # Sequences only the widest groups hold: a micro-batch has devices // widest such groups, each holding
    # as many of them as fit its memory (the shortest first: at most that many). A long document cut into
    # many chunks of the longest length otherwise sends the search through dozens of infeasible counts.
    widest = degrees[-1]
    longest_ones = np.sort(lengths[needs == widest])
    if len(longest_ones):
        per_group = max(1, int(np.searchsorted(np.cumsum(longest_ones), caps[widest], side="right")))
        fewest = max(fewest, math.ceil(len(longest_ones) / (per_group * (devices // widest))))
    cheapest_fixed = min(cost.fixed_ms(d) for d in caps)
    spread_ms = float(work.sum()) / devices  # all work on each sequence's cheapest degree, spread evenly
    option_cache: dict[bytes, list] = {}  # splits often share a micro-batch (the longest sequences' run)
    planned: dict[bytes, MicroBatch | None] = {}

    def options_of(ids: np.ndarray) -> list[tuple[float, list[int]]]:
        key = np.sort(ids).tobytes()
        if key not in option_cache:
            option_cache[key] = _options(lengths, ids, devices, cost, caps, times, degree)
        return option_cache[key]

    # Branch and bound over the splits: the one of the lowest bound first (the layouts' bounds: much tighter
    # than one over all degrees, so most micro-batches are never assigned); a split stops as soon as what it
    # has planned plus the bounds of what is left cannot beat the best plan.
    splits = []
    for split in SPLITS:
        parts = split(batch, fewest)
        options = [options_of(ids) for ids in parts]
        splits.append((sum(o[0][0] for o in options), split, parts, options))
    best = incumbent
    for _, split, parts, options in sorted(splits, key=lambda entry: entry[0]):
        m, first_fit = fewest, None
        while m <= len(lengths):
            if m > fewest:
                parts = split(batch, m)
                options = [options_of(ids) for ids in parts]
            micro, outcome = [], "planned"
            remaining = sum(o[0][0] for o in options)
            for ids, opts in zip(parts, options):
                if best is not None and sum(mb.estimated_s for mb in micro) * 1e3 + remaining >= best.estimated_s * 1e3:
                    outcome = "beaten"
                    break
                key = np.sort(ids).tobytes()
                if key not in planned:
                    planned[key] = _micro_batch(lengths, ids, devices, cost, caps, times, opts, degree, static)
                mb = planned[key]
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
            if outcome == "planned":
                plan = SPPlan(devices, tuple(micro), sum(mb.estimated_s for mb in micro))
                if best is None or plan.estimated_s < best.estimated_s:
                    best = plan
            # One more micro-batch than the fewest that fit can be faster: packed less tightly, sequences
            # need narrower groups, a gain where wide groups cost more per device (a profile of slow links).
            # Tried once per split, while its bound can beat the best plan.
            if m == first_fit and m < len(lengths) and (m + 1) * cheapest_fixed + spread_ms < best.estimated_s * 1e3:
                m += 1
                continue
            break
    if best is None:
        raise InfeasibleError(f"no layout of degree {degree} holds these sequences on {devices} devices")
    return best


def plan_adaptive(lengths, devices: int, cost: CostModel) -> SPPlan:
    """Groups of mixed degrees per micro-batch, never slower than static Ulysses. Every micro-batch tries the
    static layout, but the number of micro-batches is searched only near the fewest that fit, and where wide
    groups cost far more per device than narrow ones (slow links) static's own, larger number can win by far
    (0.6x on the profiled CPU model). So static's plan, cheap (one layout per micro-batch), is made first and
    the adaptive search must beat it: it also prunes that search from the start."""
    static = _plan(lengths, devices, cost, static_degree(lengths, devices, cost))
    return _plan(lengths, devices, cost, None, incumbent=static)


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
