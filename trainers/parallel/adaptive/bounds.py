"""The lower bound: no plan of some sequences on groups of some degrees, in at least some number of
micro-batches, is estimated faster. The planner prunes with it (a layout, a split, static Ulysses's plan) and
reports it as the headroom left (`lower_bound_s`).

Write a micro-batch's time as the cheapest fixed cost b plus T (so T >= its slowest group's time less that
group's own fixed cost). Two things hold for every micro-batch of every plan:

- T >= each of its sequences' ms on that sequence's fastest allowed group: a = the largest of those;
- D * T >= its sequences' device-ms, each on its cheapest degree (a group of degree d busy for t ms uses d * t
  device-ms, and the groups together have D devices): W_j. A micro-batch holds at most C tokens (memory is
  linear in the degree, so C is the same for every layout), so W_j <= Omega * D, Omega * D being the most
  device-ms any C tokens of the step take (a fractional knapsack: densest sequences first).

Order the micro-batches by a, largest first. The first k-1 hold at most (k-1) C tokens, so of the sequences
sorted by fastest ms, the shortest prefix with more than (k-1) C tokens has one in the k-th or a later
micro-batch: the k-th one's a >= alpha_k, that prefix's last sequence's fastest ms. Summing max(alpha_k, W_k/D)
over the m micro-batches memory needs at least, with every W_k/D <= Omega and sum W_k = W:

    step ms >= m * b + sum_k alpha_k + max(0, W / D - sum_k min(alpha_k, Omega))

alpha_1 is the slowest sequence; with alpha_k = 0 for k > 1 and Omega unbounded this is the simpler
m * b + max(slowest, W / D). The k > 1 terms count that long sequences cannot all share one micro-batch, Omega
that a micro-batch of a few long sequences leaves devices idle which memory keeps the rest of the work from:
on 64 devices, heavy tail, 512 sequences, degrees capped at 32 (bench seeds 0-99) the plan was within a median
9.2% of the simpler bound and 6.0% of this one.
"""

from __future__ import annotations

import math

import numpy as np

from trainers.parallel.adaptive.table import CostTable


def lower_bound_ms(fastest_ms: np.ndarray, least_device_ms: np.ndarray, lengths: np.ndarray, fixed_ms: float,
                   micro_batches: int, devices: int, tokens_per_micro_batch: float) -> float:
    """`fastest_ms`, `least_device_ms`, `lengths`: (sequences,) each sequence's ms on its fastest group,
    device-ms on its cheapest, inf where no group holds it (then so is the bound), and tokens. `fixed_ms`: the
    cheapest fixed cost; `micro_batches`: at least this many."""
    if micro_batches == 1:  # the same, without the sorts: one micro-batch's Omega is at least its own work
        return one_micro_batch_bound_ms(fastest_ms, least_device_ms, fixed_ms, devices)
    slowest = float(fastest_ms.max())
    if not math.isfinite(slowest):
        return math.inf
    spread = float(least_device_ms.sum()) / devices
    by_time = np.argsort(-fastest_ms, kind="stable")
    prefix = np.cumsum(lengths[by_time])
    first = np.searchsorted(prefix, np.arange(micro_batches) * tokens_per_micro_batch, side="right")
    alpha = np.where(first < len(by_time), fastest_ms[by_time[np.minimum(first, len(by_time) - 1)]], 0.0)
    dense = np.argsort(-(least_device_ms / lengths), kind="stable")
    tokens, work = np.cumsum(lengths[dense]), np.cumsum(least_device_ms[dense])
    full = int(np.searchsorted(tokens, tokens_per_micro_batch, side="right"))  # densest wholly within C tokens
    omega = float(work[full - 1]) if full else 0.0
    if full < len(dense):
        omega += (tokens_per_micro_batch - (float(tokens[full - 1]) if full else 0.0)) * float(
            least_device_ms[dense[full]] / lengths[dense[full]])
    return (micro_batches * fixed_ms + float(alpha.sum())
            + max(0.0, spread - float(np.minimum(alpha, omega / devices).sum())))


def one_micro_batch_bound_ms(fastest_ms: np.ndarray, least_device_ms: np.ndarray, fixed_ms: float,
                             devices: int) -> float:
    """lower_bound_ms for one micro-batch: b + max(slowest, W / D)."""
    slowest = float(fastest_ms.max())
    if not math.isfinite(slowest):
        return math.inf
    return fixed_ms + max(slowest, float(least_device_ms.sum()) / devices)


def fewest_micro_batches(table: CostTable, ids: np.ndarray) -> int:
    """The fewest micro-batches memory allows the sequences `ids`: by tokens (all devices hold a fixed number
    whatever the layout), and by the sequences only the widest groups hold (a micro-batch has devices // widest
    such groups, each holding at most as many of them as fit, shortest first). A long document cut into many
    chunks of the longest length otherwise sends the search through dozens of infeasible counts."""
    lengths = table.lengths[ids]
    fewest = max(1, math.ceil(lengths.sum() / table.tokens_per_micro_batch()))
    widest = table.degrees[-1]
    longest_ones = np.sort(lengths[table.needs[ids] == widest])
    if len(longest_ones):
        per_group = max(1, int(np.searchsorted(np.cumsum(longest_ones), table.capacity[-1], side="right")))
        fewest = max(fewest, math.ceil(len(longest_ones) / (per_group * (table.devices // widest))))
    return fewest


def step_lower_bound_ms(table: CostTable) -> float:
    """No plan of the whole step on the table's degrees is faster, whatever its micro-batches."""
    everything = np.arange(len(table.lengths))
    return lower_bound_ms(table.fitting_ms.min(axis=0), table.device_ms.min(axis=0), table.lengths,
                          float(table.fixed_ms.min()), fewest_micro_batches(table, everything), table.devices,
                          table.tokens_per_micro_batch())
