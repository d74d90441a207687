"""The reference the fast planner is measured against: one micro-batch as a time-limited MILP over bucketed
lengths (FlexSP's formulation, solved with HiGHS through `scipy.optimize.milp`). Not exact: lengths are
bucketed and HiGHS stops at its time limit. So it returns a plan (or none), that plan's bucketed objective,
whether HiGHS proved it optimal for the bucketed problem, and a lower bound valid for the real lengths: how
far from optimal any plan of the micro-batch, the planner's or this one, can be.

Buckets. The `singles` longest sequences are a bucket each (they decide the wide groups); the rest are cut, in
length order, into at most `buckets` runs of neighbouring lengths chosen to round as few tokens as possible
(a dynamic program over members x (longest - shortest) per bucket; n^2 memory for n distinct lengths, fine for
a micro-batch's few hundred). Two MILPs of the same buckets:

- the plan: every sequence at its bucket's LONGEST length. A bucket's members are dealt to the groups it was
  given to, longest first, so each group holds at most the tokens and runs at most the time the MILP counted:
  the plan is feasible on the real lengths, and is costed on them exactly (`micro_batch.estimated_s` <=
  `bucketed_s`). A micro-batch that nearly fills the devices' memory may have no plan rounded up.
- the bound: every sequence at its bucket's SHORTEST length, and a bucket of several sequences may be split
  fluidly across groups. Any plan of the real lengths is a solution of this problem too (it holds no more
  tokens, and a sequence's time does not grow as it shrinks: every cost model here has a1, a2 >= 0), no
  slower; so HiGHS's lower bound on it bounds the real problem. (The plan MILP's own bound would not:
  rounding up can make the bucketed optimum slower than the real one.) scipy reports HiGHS's bound only once
  HiGHS has found some solution, so `bound_s` is the larger of that and a closed-form bound on the real
  lengths: the devices' mean busy time with every sequence on its cheapest degree, or the slowest sequence on
  its fastest group. Where every bucket holds one length the two MILPs are one, solved once.

Variables, for every group slot j of every allowed degree d (slots of one degree are interchangeable, so
slot j+1 is used only if slot j is):

    u[d,j]    in {0, 1}        the slot is a group of this micro-batch
    x[k,d,j]  in {0..n_k}      sequences of bucket k the group runs
    T                          the slowest group's time, minimised

    sum_dj d u[d,j] = devices                 every device in exactly one group (laid out largest first:
                                              aligned, so none straddles a node)
    sum_dj x[k,d,j] = n_k                     every sequence placed once
    sum_k L_k x[k,d,j] <= cap(d) u[d,j]       memory. A group may hold no sequence: it runs on padding, as
                                              the planner allows (FSDP's collectives span every rank)
    fixed(d) u[d,j] + sum_k t(L_k, d) x[k,d,j] <= T        fixed(d) = b + all-to-all latency

and two families of rows every plan satisfies, which tighten the LP relaxation (see _solve). Degrees run
from 1 to `max_degree` (default: the largest power of two <= devices), the cap the planner takes. HiGHS's
default relative gap, 1e-4, counts as optimal.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from trainers.parallel.adaptive.cost import CostModel, degrees_up_to
from trainers.parallel.adaptive.planner import Group, MicroBatch


@dataclass(frozen=True)
class MILPResult:
    micro_batch: MicroBatch | None
    """The plan on the real lengths, costed exactly; None where HiGHS found none within the time limit (or
    the rounded-up problem has none: a micro-batch that fills the devices' memory may not fit rounded up)."""
    bucketed_s: float
    """The plan MILP's objective: its slowest group with every sequence at its bucket's longest length
    (inf where there is no plan)."""
    bound_s: float
    """A lower bound on every plan of the real lengths: HiGHS's on the rounded-down problem, or the closed-form
    one where that is higher (see the module's docstring)."""
    optimal: bool
    """HiGHS proved the plan optimal for the rounded-up problem (not for the real lengths: see bound_s)."""
    solve_ms: float
    """Wall time of both solves."""


def _buckets(lengths: np.ndarray, count: int, singles: int) -> list[np.ndarray]:
    """Indices of `lengths`, longest bucket first, each bucket sorted longest first: the `singles` longest
    sequences one bucket each, the rest in at most `count` runs of neighbouring lengths that minimise the
    tokens rounded, sum over buckets of members x (longest - shortest)."""
    order = np.argsort(-lengths, kind="stable")
    out = [order[i:i + 1] for i in range(min(singles, len(order)))]
    rest = order[len(out):]
    if len(rest) == 0:
        return out
    values, first, counts = np.unique(-lengths[rest], return_index=True, return_counts=True)
    values = -values  # distinct lengths, longest first; `first`: where each starts in `rest`
    n = len(values)
    k = min(count, n)
    if k == n:
        cuts = list(range(n + 1))
    else:
        # cost[i, j]: one bucket of the distinct lengths i..j (j >= i), its members x (longest - shortest)
        members = np.concatenate([[0], np.cumsum(counts)])
        cost = (members[None, 1:] - members[:-1, None]) * (values[:, None] - values[None, :]).astype(float)
        cost[np.tril_indices(n, -1)] = np.inf
        best = np.full((k + 1, n + 1), np.inf)
        best[0, 0] = 0.0
        back = np.zeros((k + 1, n + 1), dtype=np.int64)
        for b in range(1, k + 1):
            total = best[b - 1, :n, None] + cost  # [i, j]: buckets 1..b-1 cover 0..i-1, bucket b is i..j
            back[b, 1:] = np.argmin(total, axis=0)
            best[b, 1:] = total[back[b, 1:], np.arange(n)]
        cuts, j = [n], n
        for b in range(k, 0, -1):
            j = int(back[b, j])
            cuts.append(j)
        cuts = cuts[::-1]
    bounds = np.concatenate([first, [len(rest)]])
    return out + [rest[bounds[a]:bounds[b]] for a, b in zip(cuts[:-1], cuts[1:])]


def _solve(reps: np.ndarray, counts: np.ndarray, integral: np.ndarray, slots: list[int], devices: int,
           cost: CostModel, time_limit_s: float):
    """The MILP of buckets of `counts` sequences at lengths `reps` (`integral`: whether a bucket's counts are
    integers) on group slots of degrees `slots`, largest first. Returns scipy's result and x's column."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    K, S = len(reps), len(slots)
    n = S + K * S + 1  # u[s], then x[k, s] at S + k*S + s, then T
    T = n - 1

    def x(k, s):
        return S + k * S + s

    caps = np.array([cost.max_tokens(d, devices) for d in slots])
    fixed = np.array([cost.fixed_ms(d) for d in slots])
    ms = {d: [cost.sequence_ms(float(r), d) for r in reps] for d in set(slots)}
    t = np.array([ms[d] for d in slots]).T  # (K, S): a bucket's sequence on a slot's group
    upper = np.zeros(n)
    upper[:S] = 1
    upper[S:T] = np.where(reps[:, None] <= caps[None, :], counts[:, None], 0).ravel()
    upper[T] = np.inf

    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(entries, low, high):
        for c, v in entries:
            rows.append(len(lo))
            cols.append(c)
            vals.append(v)
        lo.append(low)
        hi.append(high)

    ks = range(K)
    row([(s, d) for s, d in enumerate(slots)], devices, devices)
    for s in range(S - 1):  # symmetry: slot j+1 of a degree is used only if slot j is. (Ordering their times
        if slots[s] == slots[s + 1]:  # too kept HiGHS from finding any plan of 100 sequences in 5 s.)
            row([(s, 1), (s + 1, -1)], 0, np.inf)
    for k in ks:
        row([(x(k, s), 1) for s in range(S)], counts[k], counts[k])
    for s in range(S):
        row([(s, -caps[s])] + [(x(k, s), reps[k]) for k in ks], -np.inf, 0)  # memory
        row([(s, fixed[s]), (T, -1)] + [(x(k, s), t[k, s]) for k in ks], -np.inf, 0)  # time
    # Two rows no integer plan needs, that tighten the LP relaxation (HiGHS's bound) where u is fractional:
    # a device's mean busy time, over all devices, is at most T ...
    row([(T, -1)] + [(s, d * fixed[s] / devices) for s, d in enumerate(slots)]
        + [(x(k, s), d * t[k, s] / devices) for s, d in enumerate(slots) for k in ks], -np.inf, 0)
    # ... and so is every sequence's group, fixed cost included: the mean over a bucket's members. With these,
    # 21 long sequences on 64 devices (a micro-batch of the bench's heavy tail) were proved optimal in 4 s;
    # without the second, 5 s had left a plan of 3,305 ms against a bound of 2,792 ms (the optimum: 3,215 ms).
    for k in ks:
        row([(T, -1)] + [(x(k, s), (fixed[s] + t[k, s]) / counts[k]) for s in range(S)], -np.inf, 0)
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lo), n)).tocsr()

    objective = np.zeros(n)
    objective[T] = 1
    integrality = np.zeros(n)
    integrality[:S] = 1
    integrality[S:T] = np.repeat(integral.astype(float), S)
    result = milp(objective, constraints=LinearConstraint(matrix, lo, hi), integrality=integrality,
                  bounds=Bounds(np.zeros(n), upper), options={"time_limit": time_limit_s, "disp": False})
    return result, x


def _closed_form_bound_ms(lengths: np.ndarray, degrees: list[int], devices: int, cost: CostModel) -> float:
    """No plan of the real lengths is faster: the devices' mean busy time with every sequence on its cheapest
    degree (device-ms), or the slowest sequence on its fastest group."""
    fixed = min(cost.fixed_ms(d) for d in degrees)
    work, slowest = 0.0, 0.0
    for s in lengths.tolist():
        fitting = [d for d in degrees if cost.max_tokens(d, devices) >= s]
        work += min(d * cost.sequence_ms(s, d) for d in fitting)
        slowest = max(slowest, min(cost.fixed_ms(d) + cost.sequence_ms(s, d) for d in fitting))
    return max(fixed + work / devices, slowest)


def _dual_bound_ms(result) -> float:
    """HiGHS's lower bound on its problem (-inf where it has none: scipy reports none until a plan is found)."""
    bound = getattr(result, "mip_dual_bound", None)
    if bound is None or not math.isfinite(bound):
        return -math.inf
    return min(bound, result.fun) if result.status == 0 else bound


def solve_micro_batch(lengths, devices: int, cost: CostModel, max_degree: int | None = None, buckets: int = 32,
                      singles: int = 16, time_limit_s: float = 10.0) -> MILPResult:
    """The MILP plan of one micro-batch of `lengths` on `devices`, groups of degree at most `max_degree`, and a
    lower bound on any plan of it. `time_limit_s` applies to each of the two solves."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0 or lengths.min() < 1:
        raise ValueError(f"lengths must be a non-empty list of positive sequence lengths, got {lengths.tolist()[:8]}")
    degrees = degrees_up_to(devices)
    if max_degree is not None:
        if max_degree not in degrees:
            raise ValueError(f"max_degree = {max_degree}: must be a power of two at most devices = {devices}")
        degrees = [d for d in degrees if d <= max_degree]
    largest = degrees[-1]
    if lengths.max() > cost.max_tokens(largest, devices):
        raise ValueError(f"a sequence of {int(lengths.max())} tokens: more than the largest group allowed (degree "
                         f"{largest}) holds, {cost.max_tokens(largest, devices):.0f} tokens")
    if lengths.sum() > cost.max_tokens(1, devices) * devices:  # what every layout holds (linear in the degree)
        raise ValueError(f"{int(lengths.sum())} tokens: more than {devices} devices hold in one micro-batch, "
                         f"{cost.max_tokens(1, devices) * devices:.0f}")
    members = _buckets(lengths, buckets, singles)
    longest = np.array([lengths[m].max() for m in members], dtype=float)
    shortest = np.array([lengths[m].min() for m in members], dtype=float)
    counts = np.array([len(m) for m in members])
    slots = [d for d in reversed(degrees) for _ in range(devices // d)]  # largest first: aligned offsets

    started = time.perf_counter()
    result, x = _solve(longest, counts, np.ones(len(members), bool), slots, devices, cost, time_limit_s)
    if np.array_equal(longest, shortest):
        bound_ms = _dual_bound_ms(result)
    else:  # the bound's own MILP: rounded down, and a bucket of several sequences may be split fluidly
        relaxed, _ = _solve(shortest, counts, counts == 1, slots, devices, cost, time_limit_s)
        bound_ms = _dual_bound_ms(relaxed)
    bound_ms = max(bound_ms, _closed_form_bound_ms(lengths, degrees, devices, cost))
    solve_ms = (time.perf_counter() - started) * 1e3
    if result.x is None:
        return MILPResult(None, math.inf, bound_ms / 1e3, False, solve_ms)

    sol = np.rint(result.x).astype(int)
    used = [s for s in range(len(slots)) if sol[s] == 1]
    given: dict[int, list[int]] = {s: [] for s in used}
    for k, bucket in enumerate(members):  # each bucket's members dealt longest first, in slot order
        queue = bucket.tolist()
        for s in used:
            take = sol[x(k, s)]
            given[s] += queue[:take]
            queue = queue[take:]
    groups, first = [], 0
    for s in used:
        d = slots[s]
        seqs = tuple(sorted(given[s]))
        ms = cost.group_ms(lengths[list(seqs)].tolist(), d)
        groups.append(Group(d, tuple(range(first, first + d)), seqs, ms / 1e3))
        first += d
    micro = MicroBatch(tuple(groups), max(g.estimated_s for g in groups))
    return MILPResult(micro, result.fun / 1e3, bound_ms / 1e3, result.status == 0, solve_ms)
