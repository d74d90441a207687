"""Profile the adaptive SP cost model on the actual devices (`flotilla profile`): what every rank of the SP
domain runs.

1. Forward+backward of one sequence of each length on every rank at once, in a degree-1 group, through the
   real trainer (FSDP's gathers and reductions over all ranks included, as in training): a least-squares fit
   of t(s) = a1 s^2 + a2 s + b gives the cost model's a1, a2 and b. The same in every aligned group of each
   larger degree (Ulysses all-to-alls included) gives that degree's own measured (a1, a2, b): where cores
   are shared or links slow, a group of d does not run d times faster, and the measured table says so.
2. All-to-alls of two sizes in every aligned group of each degree at once: latency and bandwidth by degree.
Timings are medians over repeats after a warm-up. All ranks measure together, so contention for shared
cores, memory bandwidth or links is in the numbers, as it will be in training.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from trainers.data import Batch
from trainers.loop import Trainee, token_loss_sum
from trainers.parallel.adaptive.cost import degrees_up_to
from trainers.parallel.sequence import shard_sequence

REPEATS = 5
ALLTOALL_BYTES = (2**16, 2**22)  # per device: 64 KiB mostly latency, 4 MiB mostly bandwidth


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _median_ms(fn, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def time_sequences(t: Trainee, lengths: list[int], degree: int = 1) -> list[float]:
    """Milliseconds of one forward+backward of a sequence of each length, every rank at once: in degree-1
    groups, or (degree > 1) each aligned group of `degree` running one sequence through Ulysses, as the
    executor runs it. Lengths are rounded up to a multiple of the degree."""
    vocab = t.cfg.model.vocab_size
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = rank // degree * degree
    out = []
    for n in lengths:
        n = -(-n // degree) * degree
        tokens = torch.randint(0, vocab - 1, (1, n + 1), generator=torch.Generator().manual_seed(n))
        whole = Batch(tokens[:, :-1], tokens[:, 1:], torch.arange(n)[None], torch.tensor([0, n], dtype=torch.int32), n)
        batch = shard_sequence(whole, rank - first, degree).to(t.device)
        if t.adaptive.router is not None:
            t.adaptive.router.route(tuple(range(first, first + degree)))

        def step() -> None:
            token_loss_sum(t, batch).backward()
            t.optimizer.zero_grad(set_to_none=True)

        out.append(_median_ms(step, t.device))
    return out


def fit_compute(lengths: list[int], ms: list[float]) -> tuple[float, float, float]:
    """(a1, a2, b) of t = a1 s^2 + a2 s + b, least squares with every coefficient >= 0 (a negative term would
    make longer sequences look cheaper). Columns are scaled to comparable size before solving."""
    from scipy.optimize import nnls

    s = np.asarray(lengths, dtype=np.float64)
    design = np.stack([s * s, s, np.ones_like(s)], axis=1)
    scale = design.max(axis=0)
    coef, _ = nnls(design / scale, np.asarray(ms, dtype=np.float64))
    return tuple(float(c) for c in coef / scale)


def time_alltoall(devices: int, device: torch.device) -> dict[int, tuple[float, float]]:
    """{degree: (latency ms, GB/s)} from all-to-alls of two sizes in every aligned group of each degree at once."""
    rank = dist.get_rank()
    out = {}
    for degree in degrees_up_to(devices)[1:]:
        groups = [dist.new_group(list(range(first, first + degree))) for first in range(0, devices - degree + 1, degree)]
        mine = groups[rank // degree] if rank < degree * len(groups) else None
        ms = []
        for size in ALLTOALL_BYTES:
            x = torch.ones(size // 4, dtype=torch.float32, device=device)
            y = torch.empty_like(x)
            ms.append(_median_ms(lambda: mine is not None and dist.all_to_all_single(y, x, group=mine), device))
        (small, large), (small_ms, large_ms) = ALLTOALL_BYTES, ms
        sent = (large - small) * (degree - 1) / degree  # bytes leaving each device, beyond the small call's
        per_byte_ms = max(1e-12, (large_ms - small_ms) / sent)
        latency = max(0.0, small_ms - small * (degree - 1) / degree * per_byte_ms)
        out[degree] = (latency, 1e-6 / per_byte_ms)  # bytes/ms -> GB/s: 1e3 / 1e9
    return out
