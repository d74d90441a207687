"""Branch and bound over the splits of a step into micro-batches, sharing one plan's state: the cost table,
every micro-batch planned so far (splits, passes and cuts share many) and its candidate layouts' bounds."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from trainers.parallel.adaptive import layouts
from trainers.parallel.adaptive.assign import plan_micro_batch
from trainers.parallel.adaptive.bounds import fewest_micro_batches, lower_bound_ms, one_micro_batch_bound_ms
from trainers.parallel.adaptive.plan import MicroBatch, total_s
from trainers.parallel.adaptive.splits import SORTED_FILL, SplitInput
from trainers.parallel.adaptive.table import CostTable


class StepPlanner:
    """Plans micro-batches of one step's sequences on groups of the table's degrees, or (`degree`) on the
    homogeneous layout of that degree alone."""

    def __init__(self, table: CostTable, degree: int | None = None):
        self.table, self.degree = table, degree
        self.lengths, self.devices, self.degrees = table.lengths, table.devices, table.degrees
        self.capacity = dict(zip(table.degrees, table.capacity.tolist()))
        self.fixed_ms = dict(zip(table.degrees, table.fixed_ms.tolist()))
        self.split_input = SplitInput(table.lengths, table.needs, table.device_ms.min(axis=0), table.devices,
                                      table.tokens_per_micro_batch())
        self.homogeneous = {layouts.homogeneous(self.devices, d) for d in self.degrees}
        self.need_rows = np.log2(table.needs).astype(np.int64)
        self.shortest_first = np.argsort(table.lengths, kind="stable")
        self._layouts: dict[bytes, list[layouts.Option]] = {}
        self._over: dict[frozenset, tuple[np.ndarray, np.ndarray]] = {}
        self._planned: dict[bytes, MicroBatch | None] = {}
        self._by_lengths: dict[bytes, tuple[np.ndarray, MicroBatch | None]] = {}

    def over_degrees(self, degrees: frozenset) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's ms on the fastest of `degrees` and device-ms on the cheapest (inf where none holds
        it), once per set per plan: every micro-batch's layouts draw on the same few sets."""
        if degrees not in self._over:
            rows = [self.table.row(d) for d in degrees]
            self._over[degrees] = self.table.fitting_ms[rows].min(axis=0), self.table.device_ms[rows].min(axis=0)
        return self._over[degrees]

    def bound_ms(self, ids: np.ndarray, degrees: frozenset, micro_batches: int) -> float:
        """No plan of the sequences `ids` in `micro_batches` on groups of `degrees` is faster (bounds.py)."""
        fastest, least_device = self.over_degrees(degrees)
        if micro_batches == 1:  # lower_bound_ms's own shortcut, without gathering what it does not read
            return one_micro_batch_bound_ms(fastest[ids], least_device[ids], min(self.fixed_ms[d] for d in degrees),
                                            self.devices)
        return lower_bound_ms(fastest[ids], least_device[ids], self.lengths[ids],
                              min(self.fixed_ms[d] for d in degrees), micro_batches, self.devices,
                              self.table.tokens_per_micro_batch())

    def layouts(self, ids: np.ndarray) -> list[layouts.Option]:
        """A micro-batch's candidate layouts, lowest bound first."""
        key = np.sort(self.lengths[ids]).tobytes()  # layouts and bounds depend on the lengths alone
        if key not in self._layouts:
            if self.degree is not None:
                candidates = (layouts.homogeneous(self.devices, self.degree),)
            else:
                needs = tuple(np.sort(self.table.needs[ids])[::-1][:self.devices].tolist())
                candidates = layouts.candidate_layouts(needs, self.devices, self.degrees)
            rows = len(self.degrees)  # tokens of the sequences needing each degree or more:
            needing = np.cumsum(np.bincount(self.need_rows[ids], weights=self.lengths[ids], minlength=rows)[::-1])
            needing = needing[::-1].tolist()
            per_device = float(self.table.capacity[0])
            by_set: dict[frozenset, float] = {}  # a layout's bound depends only on its set of degrees
            options = []
            for layout in candidates:
                degrees = frozenset(layout)
                if degrees not in by_set:
                    by_set[degrees] = self.bound_ms(ids, degrees, 1)
                bound = by_set[degrees] if layouts.can_hold(layout, needing, per_device) else math.inf
                options.append(layouts.Option(bound, layout, layout in self.homogeneous))
            self._layouts[key] = sorted(options, key=lambda option: option.bound_ms)
        return self._layouts[key]

    def layout_bound_ms(self, ids: np.ndarray) -> float:
        """No plan of the sequences `ids` as one micro-batch is faster."""
        return self.layouts(ids)[0].bound_ms

    def micro_batch(self, ids: np.ndarray) -> MicroBatch | None:
        """The plan of a micro-batch of the sequences `ids`, planned once per multiset of lengths: a long
        document cut into many chunks of the longest length makes as many micro-batches of one chunk each."""
        key = np.sort(ids).tobytes()
        if key not in self._planned:
            ordered = ids[np.lexsort((ids, self.lengths[ids]))]  # shortest first, ties by index
            by_length = self.lengths[ordered].tobytes()
            if by_length not in self._by_lengths:
                mb = None
                if self.lengths[ordered].sum() <= self.table.tokens_per_micro_batch():
                    mb = plan_micro_batch(ordered, self.lengths[ordered], self.table.ms[:, ordered], self.capacity,
                                          self.fixed_ms, self.layouts(ordered))
                self._by_lengths[by_length] = ordered, mb
            planned_for, mb = self._by_lengths[by_length]
            if mb is not None and planned_for is not ordered:  # the same lengths at other indices
                to = dict(zip(planned_for.tolist(), ordered.tolist()))
                mb = replace(mb, groups=tuple(replace(g, sequences=tuple(sorted(to[i] for i in g.sequences)))
                                              for g in mb.groups))
            self._planned[key] = mb
        return self._planned[key]

    def best_split(self, pool: np.ndarray, splits, budget_ms: float,
                   fill: float = SORTED_FILL, one_more: bool = True) -> list[MicroBatch] | None:
        """The sequences `pool` in the fewest micro-batches that fit, split each way in `splits`; the fastest
        under `budget_ms`, or None. The split of the lowest bound first (the sum of its micro-batches' bounds),
        and a split stops as soon as what it has planned plus the bounds of what is left cannot beat the best.
        `one_more`: whether one more micro-batch than the fewest that fit is tried too."""
        seqs = replace(self.split_input[pool], fill=fill)
        fewest = fewest_micro_batches(self.table, pool)
        all_degrees = frozenset(self.degrees)
        best, best_ms = None, budget_ms
        ordered = []
        for split in splits:
            parts = [pool[p] for p in split(seqs, fewest)]
            ordered.append((sum(self.layout_bound_ms(ids) for ids in parts), split, parts))
        for _, split, parts in sorted(ordered, key=lambda entry: entry[0]):
            m, first_fit = fewest, None
            while m <= len(pool):
                if m > fewest:
                    parts = [pool[p] for p in split(seqs, m)]
                micro, outcome = [], "planned"
                remaining = sum(self.layout_bound_ms(ids) for ids in parts)
                for ids in parts:
                    if total_s(micro) * 1e3 + remaining >= best_ms:
                        outcome = "beaten"
                        break
                    mb = self.micro_batch(ids)
                    if mb is None:
                        outcome = "infeasible"
                        break
                    micro.append(mb)
                    remaining -= self.layout_bound_ms(ids)
                if outcome != "infeasible" and first_fit is None:
                    first_fit = m
                if outcome == "infeasible":
                    m += max(1, m // 16)  # many micro-batches: step faster (one more micro-batch is b in ~m)
                    continue
                if outcome == "planned" and total_s(micro) * 1e3 < best_ms:
                    best, best_ms = micro, total_s(micro) * 1e3
                # One more micro-batch than the fewest that fit can be faster: packed less tightly, sequences
                # need narrower groups, a gain where wide groups cost more per device (a profile of slow links).
                # Tried once per split, while its bound can beat the best plan.
                if (one_more and m == first_fit and m < len(pool)
                        and self.bound_ms(pool, all_degrees, m + 1) < best_ms):
                    m += 1
                    continue
                break
        return best
