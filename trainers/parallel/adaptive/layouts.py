"""Candidate layouts of one micro-batch: the degrees of its groups, largest first. Laid out at consecutive
offsets in that order, every group of degree d starts at a multiple of d (an aligned block of ranks), so none
straddles a node unless it spans whole nodes."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple


class Option(NamedTuple):
    """A candidate layout of one micro-batch."""
    bound_ms: float
    """No assignment of the micro-batch's sequences onto it is faster (inf: they cannot fit it)."""
    layout: tuple[int, ...]
    homogeneous: bool


def layout(devices: int, wide: list[int], fill: int) -> tuple[int, ...]:
    """Groups of the degrees `wide` while they fit, then groups of `fill`, then the remainder in the largest
    powers of two that fit (each below `fill`); descending."""
    out, left = [], devices
    for d in wide:
        if d <= left:
            out.append(d)
            left -= d
    while left:
        d = fill if fill <= left else 2 ** int(math.log2(left))
        out.append(d)
        left -= d
    return tuple(sorted(out, reverse=True))


def homogeneous(devices: int, degree: int) -> tuple[int, ...]:
    """Every group of `degree`; a remainder of devices, when `degree` does not divide them, in smaller groups."""
    return layout(devices, [], degree)


@functools.lru_cache(maxsize=4096)  # pure; runs of short sequences need the same layouts, batch after batch
def candidate_layouts(needs: tuple[int, ...], devices: int, degrees: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Layouts worth trying for one micro-batch, from the degree each of its longest sequences needs (`needs`,
    descending) and the allowed `degrees` (ascending): every homogeneous degree that holds the longest
    sequence and, for every fill degree k, one group per sequence too long for k (at the degree it needs, 2x or
    4x that: attention is quadratic, so a long sequence often runs faster on a wider group) with the rest in k."""
    widest = degrees[-1]
    out = [homogeneous(devices, d) for d in degrees if d >= needs[0]]
    for k in degrees:
        longs = [d for d in needs if d > k] or [2 * k]  # no sequence needs more than k: one wider group
        for widen in (1, 2, 4):
            out.append(layout(devices, [min(widest, d * widen) for d in longs], k))
    return tuple(dict.fromkeys(out))


def can_hold(layout: tuple[int, ...], needing: list[float], per_device: float) -> bool:
    """Whether the groups of each degree d or more have the memory for the sequences needing d or more
    (`needing`: their tokens for d = 1, 2, 4, ...): a group's token capacity is linear in its degree. Only a
    necessary condition, but one that spares the greedy a pass that would fail."""
    devices_at_least = _devices_at_least(layout, len(needing))
    return all(tokens <= per_device * devices for tokens, devices in zip(needing, devices_at_least))


@functools.lru_cache(maxsize=4096)
def _devices_at_least(layout: tuple[int, ...], degrees: int) -> tuple[int, ...]:
    """Devices in groups of degree at least 1, 2, 4, ... (`degrees` of them)."""
    out = [0] * degrees
    for d in layout:
        for r in range(d.bit_length()):
            out[r] += d
    return tuple(out)
