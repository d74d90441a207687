"""How a step's sequences are cut into micro-batches: each split takes the sequences and a number of
micro-batches m and returns the micro-batches' sequences (there may be more than m where memory says so)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import numpy as np

SORTED_FILL = 0.97  # of the devices' memory a sorted run may take: room for the layout's rounding. On the bench's
# seeds 0-99 (64 devices, heavy, 512 sequences, degrees <= 32): 0.95 lost 0.25% of the median speed-up, 0.98
# gained 0.1%, within what one seed more or less moves the median


@dataclass(frozen=True)
class SplitInput:
    """What the splits know of the sequences."""
    lengths: np.ndarray
    needs: np.ndarray
    """The smallest degree that holds each sequence."""
    work: np.ndarray
    """Device-ms of each sequence on its cheapest degree (d x its time on a group of d)."""
    devices: int
    capacity: float
    """Tokens all devices hold in one micro-batch."""
    fill: float = SORTED_FILL
    """Of `capacity`, what a sorted run may take."""

    def __getitem__(self, ids: np.ndarray) -> SplitInput:
        return replace(self, lengths=self.lengths[ids], needs=self.needs[ids], work=self.work[ids])


def balanced(seqs: SplitInput, m: int) -> list[np.ndarray]:
    """m micro-batches of about equal tokens: longest first, each to the one holding the fewest tokens."""
    bins: list[list[int]] = [[] for _ in range(m)]
    heap = [(0, b) for b in range(m)]
    for i in np.argsort(-seqs.lengths, kind="stable").tolist():
        tokens, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (tokens + int(seqs.lengths[i]), b))
    return [np.asarray(ids) for ids in bins if ids]


def sorted_by_work(seqs: SplitInput, m: int, limit: int | None = None,
                   order: np.ndarray | None = None) -> list[np.ndarray]:
    """Runs of the length-sorted sequences of about an equal share of the work left each: long sequences
    together (wide groups for all of them), short ones together (narrow groups, cheap all-to-alls). Balanced
    by work, not tokens: a token of a long sequence costs more (attention is quadratic, wide all-to-alls
    slow). A run also closes at `fill` of the devices' memory, and before the groups its sequences need
    at the least (those needing more than one device) would pass the devices; the share is then of what is
    left over the runs left, so one long sequence worth more than 1/m of the work does not push the short
    tail into a run of its own. A run takes more than its share where the runs left could not hold the rest
    at `fill` (rounding at each boundary would otherwise leave a run of a few hundred tokens, each micro-batch
    costing b). There may still be more than m runs; `limit`: only the first so many. `order`: the sequences
    longest first, ties by position, where the caller has it without a sort."""
    if order is None:
        order = np.argsort(-seqs.lengths, kind="stable")
    n = len(order)
    wide = np.where(seqs.needs[order] > 1, seqs.needs[order], 0)  # devices the run's groups need at the least
    # prefix sums: a run [start, end) holds tokens[end] - tokens[start]
    work = np.concatenate([[0.0], np.cumsum(seqs.work[order], dtype=float)])
    tokens = np.concatenate([[0], np.cumsum(seqs.lengths[order])])
    devices = np.concatenate([[0], np.cumsum(wide)])
    per_run = seqs.capacity * seqs.fill
    parts, start = [], 0
    while start < n and (limit is None or len(parts) < limit):
        runs_left = m - len(parts)
        target = (work[n] - work[start]) / max(1, runs_left)
        most = min(int(np.searchsorted(tokens, tokens[start] + per_run, side="right")),
                   int(np.searchsorted(devices, devices[start] + seqs.devices, side="right"))) - 1
        end = int(np.searchsorted(work, work[start] + target * (1 + 1e-9), side="right")) - 1
        if runs_left > 1:
            end = max(end, int(np.searchsorted(tokens, tokens[n] - (runs_left - 1) * per_run, side="left")))
        end = max(start + 1, min(end, most))
        parts.append(order[start:end])
        start = end
    return parts


def sorted_by_tokens(seqs: SplitInput, m: int, limit: int | None = None,
                     order: np.ndarray | None = None) -> list[np.ndarray]:
    """As sorted_by_work, with runs of about 1/m of the tokens (memory-bound batches pack tighter this way)."""
    return sorted_by_work(replace(seqs, work=seqs.lengths.astype(float)), m, limit, order)


HOMOGENEOUS_SPLITS = (balanced, sorted_by_work, sorted_by_tokens)
MIXED_SPLITS = (sorted_by_work, sorted_by_tokens)  # balanced won 1 of 100 heavy-tailed batches on 64 devices
# (by 0.3%) when all three were tried
REST_SPLITS = (sorted_by_tokens,)  # the short sequences left beside the long runs: adding by work gained 0.25%
# of the mean speed-up on seeds 0-99 (none of the median) at 1.5x the planning time (p99)
