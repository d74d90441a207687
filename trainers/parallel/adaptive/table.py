"""What the cost model says about one step's sequences, computed once per plan: each sequence's ms on a group
of every allowed degree, each degree's token capacity and fixed cost, and the smallest degree holding each
sequence. Every other part of the planner reads these arrays instead of calling the cost model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainers.parallel.adaptive.cost import CostModel, degrees_up_to, is_power_of_two
from trainers.parallel.adaptive.plan import InfeasibleError


def check_lengths(lengths, devices: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError("lengths must be a non-empty list of sequence lengths")
    if devices < 1:
        raise ValueError(f"devices = {devices}: must be at least 1")
    if lengths.min() < 1:
        raise ValueError(f"lengths: {int(lengths.min())} is not a sequence length (at least 1)")
    return lengths


def allowed_degrees(devices: int, max_degree: int | None) -> list[int]:
    """1, 2, 4, ... up to `max_degree` (None: the largest power of two within `devices`)."""
    degrees = degrees_up_to(devices)
    if max_degree is None:
        return degrees
    if not (isinstance(max_degree, (int, np.integer)) and not isinstance(max_degree, bool)
            and is_power_of_two(int(max_degree))
            and max_degree <= devices):
        raise ValueError(f"max_degree = {max_degree}: must be a power of two at most devices = {devices} "
                         f"(one of {degrees})")
    return degrees[:degrees.index(int(max_degree)) + 1]


@dataclass(frozen=True)
class CostTable:
    lengths: np.ndarray
    """(sequences,) tokens."""
    devices: int
    degrees: tuple[int, ...]
    """Ascending, 1 up to the largest allowed."""
    capacity: np.ndarray
    """(degrees,) tokens a group of each degree holds."""
    fixed_ms: np.ndarray
    """(degrees,) a group's cost per micro-batch however many sequences it runs."""
    ms: np.ndarray
    """(degrees, sequences) each sequence's ms on a group of each degree, fixed cost excluded."""
    fitting_ms: np.ndarray
    """`ms`, inf where the degree's group cannot hold the sequence."""
    device_ms: np.ndarray
    """`fitting_ms` x degree: the device time each sequence takes on each degree."""
    needs: np.ndarray
    """(sequences,) the smallest degree whose group holds each one."""

    @classmethod
    def build(cls, lengths, devices: int, cost: CostModel, max_degree: int | None) -> CostTable:
        """Raises InfeasibleError if the longest sequence fits no allowed group."""
        lengths = check_lengths(lengths, devices)
        degrees = allowed_degrees(devices, max_degree)
        capacity = np.asarray([cost.max_tokens(d, devices) for d in degrees])
        longest = int(np.argmax(lengths))
        if lengths[longest] > capacity[-1]:
            raise InfeasibleError(
                f"sequence {longest} has {int(lengths[longest])} tokens: more than the largest group allowed (degree "
                f"{degrees[-1]} of {devices} devices) can hold, {capacity[-1]:.0f} tokens; cut sequences to at most "
                f"that many, or allow wider groups")
        as_float = lengths.astype(float)
        ms = np.stack([np.asarray(cost.sequence_ms(as_float, d), dtype=float) for d in degrees])
        fits = lengths[None, :] <= capacity[:, None]
        fitting_ms = np.where(fits, ms, np.inf)
        needs = np.asarray(degrees)[np.searchsorted(capacity, lengths, side="left")]
        return cls(lengths, devices, tuple(degrees), capacity, np.asarray([cost.fixed_ms(d) for d in degrees]),
                   ms, fitting_ms, fitting_ms * np.asarray(degrees, dtype=float)[:, None], needs)

    def row(self, degree: int) -> int:
        """The row of `degree` in the (degrees, ...) arrays: degrees are 1, 2, 4, ..."""
        return degree.bit_length() - 1

    def tokens_per_micro_batch(self) -> float:
        """What all devices hold in one micro-batch, whatever the layout: a group's capacity is linear in its
        degree (each device holds tokens / degree)."""
        return float(self.capacity[0]) * self.devices

    def static_degree(self) -> int:
        """The smallest allowed degree whose group holds the longest sequence: static Ulysses's."""
        return int(self.needs.max())

    def up_to(self, degree: int) -> CostTable:
        """The table of degrees at most `degree` (a homogeneous plan's groups, its remainder included)."""
        rows = self.row(degree) + 1
        return CostTable(self.lengths, self.devices, self.degrees[:rows], self.capacity[:rows], self.fixed_ms[:rows],
                         self.ms[:rows], self.fitting_ms[:rows], self.device_ms[:rows], self.needs)
