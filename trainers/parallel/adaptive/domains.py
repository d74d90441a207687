"""Adaptive SP over several SP domains: parallel.dp_replicate = R domains of parallel.sp = S devices each.

Each domain is an SP domain of its own: it runs its share of the step's sequences as the planner (planner.py, on
S devices) splits that share into micro-batches of mixed-degree groups, none wider than the domain. FSDP
replicates the model over the domains and shards it within each (HSDP), so the domains need not run in step:
each runs as many micro-batches as its share needs, and their gradients meet in one all-reduce after each
domain's last micro-batch (trainers/loop.py). The step takes its slowest domain's time, so the split balances
the cost model's estimate of each domain's time, not sequence counts or tokens:

1. Longest processing time first: sequences in order of their device-ms (on their cheapest group, plus their
   tokens' share of the fixed cost b of the micro-batches they fill), each to the domain with the least so far.
2. Every domain's share planned; then, up to REFINE_ROUNDS times while the slowest domain is more than
   EVEN_ENOUGH over the mean, one of the slowest domain's sequences (those whose device-ms is nearest half the
   gap to the fastest domain first) moves to the fastest, kept where both re-planned domains end faster than
   the slowest was (so the step's estimate never grows); where none of REFINE_CANDIDATES does, it stops.

Step 1 alone is what counts when one sequence outweighs the rest of a domain's share (then no split does better:
its domain's time is that sequence's on the widest group), step 2 the micro-batch rounding the device-ms leaves
out. bench/sp_domains.py (flexsp-7b, 512 sequences, 20 seeds; R x S = 2 x 32, 4 x 16, 8 x 8, heavy-tailed and
log-normal lengths), the estimated slowest domain over the mean, median (worst): dealt out by count 1.10-1.26
(up to 1.63); step 1 1.003-1.022 (1.081); steps 1 and 2 1.002-1.006 (1.041, a domain of one long sequence).
Planning all the shares took 17-39 ms of CPU time (median, heavy-tailed lengths) where one domain of all 64
devices plans in 7 ms: off the critical path, in the executor's planning process.

Deterministic, as the planner: stable sorts, ties to the lower index or domain, so every rank splits alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainers.parallel.adaptive.cost import CostModel
from trainers.parallel.adaptive.plan import Group, MicroBatch, SPPlan
from trainers.parallel.adaptive.planner import plan_adaptive
from trainers.parallel.adaptive.table import CostTable

REFINE_ROUNDS = 4
"""Moves from the slowest domain to the fastest after the greedy split."""
REFINE_CANDIDATES = 3
"""Sequences tried per move, nearest half the gap first: each try plans two shares. bench/sp_domains.py: 8 rounds
or 6 candidates gained at most 0.1% of the step more (median), for up to twice the plans."""
EVEN_ENOUGH = 0.005
"""No refinement once the slowest domain is within 0.5% of the mean: a move plans two shares, about as long as
planning the whole step on one domain of every device."""


@dataclass(frozen=True)
class DomainPlans:
    """One step split between SP domains: domain r runs shares[r] as plans[r] on its own devices."""

    shares: tuple[tuple[int, ...], ...]
    """Per domain, the step's sequences it runs: indices into the step's lengths, ascending."""
    plans: tuple[SPPlan, ...]
    """Per domain, its plan over its devices (ranks 0 .. devices-1 of the domain); its groups' sequences index
    the domain's share."""

    @property
    def devices(self) -> int:
        """Devices of each domain."""
        return self.plans[0].devices

    @property
    def estimated_s(self) -> float:
        """The step's estimate: the domains run side by side, so their slowest's."""
        return max(p.estimated_s for p in self.plans)

    @property
    def imbalance(self) -> float:
        """The slowest domain's estimated time over the domains' mean: 1 is a perfect split."""
        times = [p.estimated_s for p in self.plans]
        return max(times) / (sum(times) / len(times))

    @classmethod
    def one(cls, plan: SPPlan, sequences: int) -> "DomainPlans":
        """A single domain running all `sequences` of the step as `plan`."""
        return cls((tuple(range(sequences)),), (plan,))


def idle_plan(devices: int, cost: CostModel) -> SPPlan:
    """A domain's plan for a step that left it no sequence: one micro-batch of padding on every device (FSDP's
    collectives within the domain, and the all-reduce between domains after its last backward, need one)."""
    seconds = cost.fixed_ms(1) / 1e3
    groups = tuple(Group(1, (r,), (), seconds) for r in range(devices))
    return SPPlan(devices, (MicroBatch(groups, seconds),), seconds)


def _weights(table: CostTable) -> np.ndarray:
    """(sequences,) device-ms of each sequence on its cheapest group, plus its tokens' share of the fixed cost of
    the micro-batches it fills: b ms on every device per micro-batch, one device holding capacity[0] tokens."""
    return table.device_ms.min(axis=0) + float(table.fixed_ms.min()) * table.lengths / float(table.capacity[0])


def split_step(lengths, domains: int, devices: int, cost: CostModel, max_degree: int | None = None
               ) -> tuple[tuple[int, ...], ...]:
    """Step 1 of the module docstring: each domain's sequences (indices into `lengths`, ascending), dealt out
    heaviest first to the least loaded domain. A domain gets none only when there are fewer sequences than
    domains. Raises InfeasibleError where a sequence fits no group of a domain."""
    return _greedy(_weights(CostTable.build(lengths, devices, cost, max_degree)), domains)


def _greedy(weights: np.ndarray, domains: int) -> tuple[tuple[int, ...], ...]:
    loads = np.zeros(domains)
    shares: list[list[int]] = [[] for _ in range(domains)]
    for i in np.argsort(-weights, kind="stable").tolist():
        r = int(np.argmin(loads))  # the first of equals
        shares[r].append(i)
        loads[r] += weights[i]
    return tuple(tuple(sorted(s)) for s in shares)


def _plan_share(lengths: np.ndarray, share: list[int] | tuple[int, ...], devices: int, cost: CostModel,
                max_degree: int | None) -> SPPlan:
    return plan_adaptive(lengths[list(share)], devices, cost, max_degree) if share else idle_plan(devices, cost)


def plan_domains(lengths, domains: int, devices: int, cost: CostModel, max_degree: int | None = None) -> DomainPlans:
    """The step of `lengths` split between `domains` SP domains of `devices` each (the module docstring), each
    share planned with groups of at most `max_degree`. One domain: the planner's plan of the whole step."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if domains == 1:
        return DomainPlans.one(plan_adaptive(lengths, devices, cost, max_degree), len(lengths))
    weights = _weights(CostTable.build(lengths, devices, cost, max_degree))  # InfeasibleError names the sequence
    shares = [list(s) for s in _greedy(weights, domains)]
    plans = [_plan_share(lengths, s, devices, cost, max_degree) for s in shares]
    for _ in range(REFINE_ROUNDS):
        times = [p.estimated_s for p in plans]
        slow, fast = int(np.argmax(times)), int(np.argmin(times))
        if times[slow] <= (1 + EVEN_ENOUGH) * sum(times) / domains or len(shares[slow]) < 2:
            break
        half_gap = (times[slow] - times[fast]) * 1e3 * devices / 2  # device-ms that would even them out
        candidates = np.asarray(shares[slow])
        nearest = candidates[np.argsort(np.abs(weights[candidates] - half_gap), kind="stable")]
        for moved in nearest[:REFINE_CANDIDATES].tolist():
            left, right = [i for i in shares[slow] if i != moved], sorted(shares[fast] + [moved])
            left_plan, right_plan = (_plan_share(lengths, s, devices, cost, max_degree) for s in (left, right))
            if max(left_plan.estimated_s, right_plan.estimated_s) < times[slow]:
                shares[slow], shares[fast], plans[slow], plans[fast] = left, right, left_plan, right_plan
                break
        else:
            break  # no candidate made the step faster
    return DomainPlans(tuple(tuple(s) for s in shares), tuple(plans))
