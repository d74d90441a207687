"""Profile the adaptive SP cost model on the actual devices (`flotilla profile`): what every rank of the SP
domain runs, measured as the executor runs it.

1. Micro-batches, in every aligned group of each degree at once (degree 1 included): each group packs `count`
   sequences of `length` tokens end to end into one row (trainers.documents.DocumentSequences.packed, padded to
   a multiple of the degree) and each rank keeps its slice (shard_sequence), exactly the executor's batch. One
   forward and backward through the real trainer, gradient sync on (FSDP reduce-scatters after every
   micro-batch, as trainers.loop.adaptive_train_step does), then zero_grad. No optimizer step: the executor
   takes one per step whatever the plan, so it is no part of what the planner chooses between.
   A least-squares fit of time = b + count * (a1 length^2 + a2 length) over micro-batches of several counts
   and lengths gives that degree's (a1, a2) per sequence and b per group and micro-batch: the count separates
   b from the per-sequence cost, the lengths a1 from a2.
2. All-to-alls of two sizes in every aligned group of each degree at once: latency and bandwidth by degree.
3. Where each rank runs (trainers.parallel.mesh.node_of_each_rank, which the executor gathered at start-up).
Timings are the least of a few repeats after a warm-up. All ranks measure together, so contention for shared
cores, memory bandwidth or links is in the numbers, as it will be in training.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from trainers.data import Batch
from trainers.documents import DocumentSequences
from trainers.loop import Trainee, token_loss_sum
from trainers.parallel.adaptive.cost import degrees_up_to
from trainers.parallel.adaptive.executor import GroupRouter
from trainers.parallel.adaptive.topology import describe_nodes, node_degree_cap
from trainers.parallel.sequence import shard_sequence

REPEATS = 3  # after a warm-up; the least of them is kept (_least_ms)
ALLTOALL_BYTES = (2**16, 2**22)  # per device: 64 KiB mostly latency, 4 MiB mostly bandwidth


def micro_batch_grid(lengths: list[int], group_tokens: int) -> list[tuple[int, int]]:
    """(count, length) of the micro-batches a group of one degree times, holding at most `group_tokens`
    tokens each: one sequence of every length that fits, and as many of it as fit (where that is 2 or more),
    the packing training does with short sequences. Pure: the driver checks it before any worker starts."""
    fits = sorted({s for s in lengths if s <= group_tokens})
    return [(1, s) for s in fits] + [(group_tokens // s, s) for s in fits if group_tokens // s >= 2]


def grid_problem(grid: list[tuple[int, int]]) -> str | None:
    """Why a grid cannot separate a1, a2 and b, or None: it needs two lengths each timed at two counts."""
    packed = {s for k, s in grid if k >= 2}
    if len(packed) < 2:
        return (f"only {len(packed)} length(s) fit at least twice in a group's micro-batch; the fit needs two (two "
                "counts of one length separate b from the per-sequence cost, two lengths a1 from a2)")
    return None


def packed_micro_batch(count: int, length: int, degree: int, position: int, vocab_size: int) -> Batch:
    """Rank `position`'s slice of its group's micro-batch of `count` random sequences of `length` inputs, built
    as the executor builds one (trainers.parallel.adaptive.executor.share_of): documents of length + 1 tokens
    (the last is only a target), packed into one row padded to a multiple of `degree`, then sharded.
    tokens: (1, ceil(count * length / degree))."""
    rng = np.random.default_rng([count, length])
    stream = rng.integers(0, vocab_size, count * (length + 1))
    sequences = DocumentSequences(stream, np.arange(count) * (length + 1), max_len=length)
    return shard_sequence(sequences.packed(range(count), pad_to_multiple=degree), position, degree)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _least_ms(fn, device: torch.device) -> float:
    """The least time of REPEATS runs after a warm-up: what other processes on the machine do only adds time
    (on 2 shared cores, medians of 5 for micro-batches of 32 to 256 tokens, which cost nearly the same, spread
    over 40-63 ms), while the contention of the profiled ranks with each other is in every run, so the least
    keeps it."""
    fn()
    times = []
    for _ in range(REPEATS):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return min(times)


def _route(t: Trainee, ranks: tuple[int, ...]) -> None:
    if t.adaptive.router is not None:  # None: one process without a process group, every group of degree 1
        t.adaptive.router.route(ranks)


def time_micro_batches(t: Trainee, grid: list[tuple[int, int]], degree: int) -> list[float]:
    """Milliseconds of each (count, length) micro-batch of `grid` in every aligned group of `degree`, all
    groups at once; the barrier after each makes it the slowest group's time. A collective: every rank calls
    it with the same grid. Ranks past the last whole group (a domain that is not a power of two) run a row of
    padding alone, as the executor runs a group the plan left idle."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    first = rank // degree * degree
    grouped = first + degree <= world
    ranks = tuple(range(first, first + degree)) if grouped else (rank,)
    vocab = t.cfg.model.vocab_size
    t.engine.set_gradient_sync(True)  # the executor reduces gradients after every micro-batch
    out = []
    for count, length in grid:
        if grouped:
            batch = packed_micro_batch(count, length, degree, rank - first, vocab)
        else:
            batch = packed_micro_batch(0, length, 1, 0, vocab)

        def micro_batch() -> None:
            _route(t, ranks)
            t.engine.backward(token_loss_sum(t, batch.to(t.device)))
            t.optimizer.zero_grad(set_to_none=True)

        out.append(_least_ms(micro_batch, t.device))
    return out


def fit_compute(counts: list[int], lengths: list[int], ms: list[float]) -> tuple[float, float, float]:
    """(a1, a2, b) of ms = b + count * (a1 length^2 + a2 length), least squares with every coefficient >= 0
    (a negative term would make longer sequences, or more of them, look cheaper).

    Each equation is divided by its measured time, so the fit minimises relative error: timings span two
    orders of magnitude, and unweighted least squares would fit the long micro-batches and leave b, which the
    short ones measure, to their noise. Columns are then scaled to comparable size before solving."""
    from scipy.optimize import nnls

    k, s, t = (np.asarray(x, dtype=np.float64) for x in (counts, lengths, ms))
    design = np.stack([k * s * s, k * s, np.ones_like(s)], axis=1) / t[:, None]
    scale = design.max(axis=0)
    coef, _ = nnls(design / scale, np.ones_like(t))
    return tuple(float(c) for c in coef / scale)


def fit_error(counts: list[int], lengths: list[int], ms: list[float], coef: tuple[float, float, float]) -> dict[str, float]:
    """Median and largest |fitted - measured| / measured over the timed micro-batches."""
    a1, a2, b = coef
    k, s, t = (np.asarray(x, dtype=np.float64) for x in (counts, lengths, ms))
    relative = np.abs(b + k * (a1 * s * s + a2 * s) - t) / t
    return {"median": float(np.median(relative)), "max": float(relative.max())}


def time_alltoall(router: GroupRouter, device: torch.device) -> dict[int, tuple[float, float]]:
    """{degree: (latency ms, GB/s)} from all-to-alls of two sizes in every aligned group of each degree at once
    (the executor's own process groups). A collective."""
    rank = dist.get_rank()
    out = {}
    for degree in degrees_up_to(router.max_degree)[1:]:
        first = rank // degree * degree
        mine = router.groups.get(tuple(range(first, first + degree)))
        ms = []
        for size in ALLTOALL_BYTES:
            x = torch.ones(size // 4, dtype=torch.float32, device=device)
            y = torch.empty_like(x)
            ms.append(_least_ms(lambda: mine is not None and dist.all_to_all_single(y, x, group=mine), device))
        (small, large), (small_ms, large_ms) = ALLTOALL_BYTES, ms
        sent = (large - small) * (degree - 1) / degree  # bytes leaving each device, beyond the small call's
        # Where noise leaves the large call no slower than the small one (shared CPUs), its own rate, latency
        # included, is what is left: a lower bound on the bandwidth, never the infinite one a difference gives.
        per_byte_ms = ((large_ms - small_ms) / sent if large_ms > small_ms
                       else large_ms / (large * (degree - 1) / degree))
        latency = max(0.0, small_ms - small * (degree - 1) / degree * per_byte_ms)
        out[degree] = (latency, 1e-6 / per_byte_ms)  # bytes/ms -> GB/s: 1e3 / 1e9
    return out


def node_layout(node_of_rank: list[int]) -> dict:
    """What the placement means for the cost model. Pure.

    devices_per_node: the largest power of two D such that every aligned block of D ranks lies in one node,
    where no block is larger than the biggest node: the node size when nodes are uniform powers of two
    numbered node by node. Otherwise (6 ranks a node, or nodes of different sizes) it is the largest group
    size that never crosses a boundary (2 for two nodes of 6: ranks 4-7 straddle), so the cost model never
    takes a straddling group for a within-node one. spans_nodes: the degrees some of whose groups hold ranks
    of more than one node; node_degree_cap: the largest degree whose groups are all within a node or whole
    nodes (topology), the largest the executor forms and so the profile measures: groups of whole nodes are
    measured, over the network they will use, and flagged in spans_nodes."""
    devices = len(node_of_rank)
    per_node = {n: node_of_rank.count(n) for n in sorted(set(node_of_rank))}

    def blocks(d: int) -> list[list[int]]:
        return [node_of_rank[first:first + d] for first in range(0, devices - d + 1, d)]

    within = [d for d in degrees_up_to(max(per_node.values())) if all(len(set(b)) == 1 for b in blocks(d))]
    spans = [d for d in degrees_up_to(devices)[1:] if any(len(set(b)) > 1 for b in blocks(d))]
    return {"node_of_rank": node_of_rank, "nodes": describe_nodes(node_of_rank),
            "ranks_per_node": {str(n): k for n, k in per_node.items()},
            "devices_per_node": max(within), "spans_nodes": spans, "node_degree_cap": node_degree_cap(node_of_rank)}


def device_memory_bytes(device: torch.device) -> int:
    """The memory of this rank's device: the GPU's, or the whole node's RAM for a CPU (its ranks share it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(t: Trainee, grids: dict[int, list[tuple[int, int]]]) -> dict:
    """Everything the cost model needs, measured on this rank's world. A collective: every rank calls it with
    the same grids, one per degree 1, 2, 4, ... Degrees go up to the executor's own cap (t.adaptive.max_degree:
    what the attention heads split into, and groups within a node or of whole nodes, from where the ranks
    really are), the only groups it ever forms. JSON-ready; rank 0's is the one to keep:
    {"node_of_rank", "max_degree", "device_memory_bytes", "micro_batches": {degree: {"grid", "ms"}},
    "alltoall": {degree: [latency ms, GB/s]}}."""
    sp = t.adaptive
    record = {"node_of_rank": sp.node_of_rank, "max_degree": sp.max_degree,
              "device_memory_bytes": device_memory_bytes(t.device), "micro_batches": {}, "alltoall": {}}
    for degree in degrees_up_to(sp.max_degree):
        grid = grids[degree]
        record["micro_batches"][str(degree)] = {"grid": grid, "ms": time_micro_batches(t, grid, degree)}
    if sp.router is not None:
        record["alltoall"] = {str(d): list(v) for d, v in time_alltoall(sp.router, t.device).items()}
    return record
