"""The adaptive SP planner, a pure function: (sequence lengths, devices, cost model, largest degree allowed) ->
plan: micro-batches, each a set of power-of-two SP groups at consecutive aligned ranks, each group with the
sequences it runs (FlexSP, Wang et al. 2024, without its MILP: planning must take milliseconds per step).

The parts, one module each:
- table.py: what the cost model says of every sequence on every allowed degree, computed once;
- splits.py: how the sequences are cut into micro-batches; long_runs.py: the long sequences' runs first, the
  short ones packed into what they leave;
- layouts.py: a micro-batch's candidate layouts of power-of-two groups;
- assign.py: a micro-batch's sequences onto a layout's groups (greedy, then moves and swaps);
- search.py: branch and bound over splits, with every micro-batch planned once;
- bounds.py: the lower bound that prunes the search and that `lower_bound_s` reports.

Static Ulysses's plan (every group of the smallest degree that holds the longest sequence) is planned too
unless the bound shows it cannot be faster: the plan is never estimated slower than static Ulysses under the
same cap. Deterministic: stable sorts, no randomness, ties broken by position. bucketed_milp.py is the exact
reference it is measured against (bench/sp_planner.py).
"""

from __future__ import annotations

import math

import numpy as np

from trainers.parallel.adaptive import layouts
from trainers.parallel.adaptive.bounds import fewest_micro_batches, step_lower_bound_ms
from trainers.parallel.adaptive.cost import CostModel
from trainers.parallel.adaptive.long_runs import plan_mixed
from trainers.parallel.adaptive.plan import Group, InfeasibleError, MicroBatch, SPPlan, total_s
from trainers.parallel.adaptive.search import StepPlanner
from trainers.parallel.adaptive.splits import HOMOGENEOUS_SPLITS
from trainers.parallel.adaptive.table import CostTable, allowed_degrees

__all__ = ["Group", "InfeasibleError", "MicroBatch", "SPPlan", "best_homogeneous", "lower_bound_s",
           "plan_adaptive", "plan_homogeneous", "static_degree"]


def _homogeneous(table: CostTable, degree: int, budget_ms: float) -> SPPlan | None:
    """Every group of `degree`, the fewest micro-batches that fit (or one more), split each way in
    HOMOGENEOUS_SPLITS; None if none is under `budget_ms`."""
    planner = StepPlanner(table.up_to(degree), degree)
    mbs = planner.best_split(np.arange(len(table.lengths)), HOMOGENEOUS_SPLITS, budget_ms)
    return None if mbs is None else SPPlan(table.devices, tuple(mbs), total_s(mbs))


def _homogeneous_bound_ms(table: CostTable, degree: int) -> float:
    """No plan of groups of `degree` (and its layout's remainder groups) alone is faster."""
    capped = table.up_to(degree)
    planner = StepPlanner(capped, degree)
    everything = np.arange(len(table.lengths))
    return planner.bound_ms(everything, frozenset(layouts.homogeneous(table.devices, degree)),
                            fewest_micro_batches(capped, everything))


def plan_adaptive(lengths, devices: int, cost: CostModel, max_degree: int | None = None) -> SPPlan:
    """Groups of mixed degrees, none above `max_degree` (None: the largest power of two within `devices`),
    per micro-batch. Never slower than static Ulysses: the number of micro-batches is searched only near the
    fewest that fit, and where wide groups cost far more per device than narrow ones (slow links) static's own,
    larger number can win by far (0.6x on the profiled CPU model). So static's plan is made too, after the
    mixed one, unless the bound says it cannot be faster (mostly it is far slower)."""
    table = CostTable.build(lengths, devices, cost, max_degree)
    mbs = plan_mixed(StepPlanner(table))
    if mbs is None:
        raise InfeasibleError(f"no layout of groups up to degree {table.degrees[-1]} holds these sequences on "
                              f"{devices} devices")
    mixed = SPPlan(devices, tuple(mbs), total_s(mbs))
    static = table.static_degree()
    if _homogeneous_bound_ms(table, static) >= mixed.estimated_s * 1e3:
        return mixed
    return _homogeneous(table, static, mixed.estimated_s * 1e3) or mixed


def static_degree(lengths, devices: int, cost: CostModel, max_degree: int | None = None) -> int:
    """The smallest power of two at most `max_degree` whose group holds the longest sequence (static Ulysses)."""
    return CostTable.build(lengths, devices, cost, max_degree).static_degree()


def plan_homogeneous(lengths, devices: int, cost: CostModel, degree: int) -> SPPlan:
    """Every group of `degree` (a remainder of devices, when `degree` does not divide them, in smaller groups)."""
    try:
        allowed_degrees(devices, degree)
    except ValueError:
        raise ValueError(f"degree = {degree}: must be a power of two at most devices = {devices}") from None
    table = CostTable.build(lengths, devices, cost, degree)
    plan = _homogeneous(table, degree, math.inf)
    if plan is None:
        raise InfeasibleError(f"no layout of degree {degree} holds these sequences on {devices} devices")
    return plan


def best_homogeneous(lengths, devices: int, cost: CostModel, max_degree: int | None = None) -> SPPlan:
    """The fastest plan of a single degree, at most `max_degree`."""
    table = CostTable.build(lengths, devices, cost, max_degree)
    plans = [_homogeneous(table, d, math.inf) for d in table.degrees if d >= table.static_degree()]
    return min((p for p in plans if p is not None), key=lambda p: p.estimated_s)


def lower_bound_s(lengths, devices: int, cost: CostModel, max_degree: int | None = None) -> float:
    """No plan with groups of at most `max_degree` is estimated faster, however it splits the step into
    micro-batches: see bounds.py."""
    return step_lower_bound_ms(CostTable.build(lengths, devices, cost, max_degree)) / 1e3
