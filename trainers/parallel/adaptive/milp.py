"""The exact reference the fast planner is measured against: one micro-batch as a MILP over bucketed lengths
(FlexSP's formulation, solved with HiGHS through `scipy.optimize.milp` under a time limit).

Sequences are put in buckets of similar length (geometric bucket edges); a bucket stands for its longest
member, so every solution of the bucketed problem is feasible for the real lengths. Variables, for every
group slot j of every degree d (slots of one degree are interchangeable, so slot j+1 is used only if slot
j is):

    u[d,j]    in {0, 1}        the slot is a group of this micro-batch
    x[k,d,j]  in {0..n_k}      sequences of bucket k the group runs
    T                          the slowest group's time, minimised

    sum_dj d u[d,j] = devices                 every device in exactly one group (aligned largest first)
    sum_dj x[k,d,j] = n_k                     every sequence placed once
    sum_k L_k x[k,d,j] <= cap(d) u[d,j]       memory
    sum_k x[k,d,j] >= u[d,j]                  no idle group (each rank runs every micro-batch)
    fixed(d) u[d,j] + sum_k t(L_k, d) x[k,d,j] <= T        fixed(d) = b + all-to-all latency

The solution is turned back into a plan of the real sequences (each bucket's members dealt to the groups it
was given to, longest first) and costed exactly, so it compares like for like with the fast planner.
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
    micro_batch: MicroBatch
    """The solution on the real lengths, costed exactly."""
    bucketed_s: float
    """The MILP's objective: the slowest group with every sequence at its bucket's longest length."""
    bound_s: float
    """HiGHS's lower bound on the bucketed objective (equal to it when solved to optimality)."""
    optimal: bool
    solve_ms: float


def _buckets(lengths: np.ndarray, count: int, singles: int) -> list[np.ndarray]:
    """Indices of `lengths`, longest bucket first: the `singles` longest sequences one bucket each (they
    decide the wide groups, and rounding them up would waste a group's memory), the rest in up to `count`
    buckets with geometric edges."""
    order = np.argsort(-lengths, kind="stable")
    out = [order[i:i + 1] for i in range(min(singles, len(order)))]
    rest = order[len(out):]
    if len(rest) == 0:
        return out
    low, high = float(lengths[rest].min()), float(lengths[rest].max())
    edges = np.geomspace(low, high, count + 1)[1:-1] if high > low else np.array([])
    which = np.searchsorted(edges, lengths[rest], side="left")
    for k in sorted(set(which.tolist()), reverse=True):
        out.append(rest[which == k])  # `rest` is sorted, so each bucket is too
    return out


def solve_micro_batch(lengths, devices: int, cost: CostModel, buckets: int = 24, singles: int = 16,
                      time_limit_s: float = 10.0) -> MILPResult:
    """The MILP plan of one micro-batch of `lengths` on `devices`. Raises ValueError if HiGHS finds no
    feasible plan within the time limit (or the bucketed problem has none)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    lengths = np.asarray(lengths, dtype=np.int64)
    members = _buckets(lengths, buckets, singles)
    rep = np.array([lengths[m].max() for m in members], dtype=float)
    counts = np.array([len(m) for m in members])
    slots = [(d, j) for d in reversed(degrees_up_to(devices)) for j in range(min(devices // d, len(lengths)))]
    K, S = len(members), len(slots)
    n = S + K * S + 1  # u, then x[k, s] at S + k*S + s, then T
    u = lambda s: s  # noqa: E731
    x = lambda k, s: S + k * S + s  # noqa: E731
    T = n - 1

    upper = np.zeros(n)
    upper[:S] = 1
    upper[T] = np.inf
    time_coef = np.zeros((K, S))
    caps = np.array([cost.max_tokens(d, devices) for d, _ in slots])
    for s, (d, _) in enumerate(slots):
        for k in range(K):
            if rep[k] <= caps[s]:
                upper[x(k, s)] = counts[k]
                time_coef[k, s] = cost.sequence_ms(rep[k], d)

    rows, lo, hi = [], [], []
    matrix = lil_matrix((2 + 2 * (S - 1) + K + 3 * S, n))
    r = 0

    def row(low, high):
        nonlocal r
        lo.append(low)
        hi.append(high)
        r += 1
        return r - 1

    i = row(devices, devices)
    for s, (d, _) in enumerate(slots):
        matrix[i, u(s)] = d
    for s in range(S - 1):  # symmetry: slot j+1 of a degree only if slot j, and it runs no longer
        if slots[s][0] == slots[s + 1][0]:
            i = row(0, np.inf)
            matrix[i, u(s)] = 1
            matrix[i, u(s + 1)] = -1
            i = row(0, np.inf)
            for k in range(K):
                matrix[i, x(k, s)] = time_coef[k, s]
                matrix[i, x(k, s + 1)] = -time_coef[k, s + 1]
    # every device is busy at most T: fixed + (device-ms of all sequences) / devices <= T (tightens the relaxation)
    i = row(-np.inf, -min(cost.fixed_ms(d) for d, _ in slots))
    matrix[i, T] = -1
    for s, (d, _) in enumerate(slots):
        for k in range(K):
            matrix[i, x(k, s)] = d * time_coef[k, s] / devices
    for k in range(K):
        i = row(counts[k], counts[k])
        for s in range(S):
            matrix[i, x(k, s)] = 1
    for s in range(S):
        i = row(-np.inf, 0)  # memory
        matrix[i, u(s)] = -caps[s]
        for k in range(K):
            matrix[i, x(k, s)] = rep[k]
        i = row(0, np.inf)  # not idle
        matrix[i, u(s)] = -1
        for k in range(K):
            matrix[i, x(k, s)] = 1
        i = row(-np.inf, 0)  # time
        matrix[i, u(s)] = cost.fixed_ms(slots[s][0])
        matrix[i, T] = -1
        for k in range(K):
            matrix[i, x(k, s)] = time_coef[k, s]
    matrix = matrix[:r].tocsr()

    objective = np.zeros(n)
    objective[T] = 1
    integrality = np.ones(n)
    integrality[T] = 0
    started = time.perf_counter()
    result = milp(objective, constraints=LinearConstraint(matrix, lo, hi), integrality=integrality,
                  bounds=Bounds(np.zeros(n), upper), options={"time_limit": time_limit_s, "disp": False})
    solve_ms = (time.perf_counter() - started) * 1e3
    if result.x is None:
        raise ValueError(f"MILP found no plan for {len(lengths)} sequences on {devices} devices: {result.message}")

    sol = np.rint(result.x).astype(int)
    used = [s for s in range(S) if sol[u(s)] == 1]
    used.sort(key=lambda s: -slots[s][0])  # largest first: aligned offsets
    given = {s: [] for s in used}
    for k in range(K):
        queue = list(members[k])
        for s in used:
            take = sol[x(k, s)]
            given[s] += queue[:take]
            queue = queue[take:]
    groups, first = [], 0
    for s in used:
        d = slots[s][0]
        seqs = tuple(sorted(int(i) for i in given[s]))
        ms = cost.group_ms(lengths[list(seqs)], d)
        groups.append(Group(d, tuple(range(first, first + d)), seqs, ms / 1e3))
        first += d
    micro = MicroBatch(tuple(groups), max(g.estimated_s for g in groups))
    bound = getattr(result, "mip_dual_bound", None)
    bound_s = (bound if bound is not None and math.isfinite(bound) else result.fun) / 1e3
    return MILPResult(micro, result.fun / 1e3, bound_s, result.status == 0, solve_ms)
