"""What the adaptive SP planner returns: per micro-batch, power-of-two SP groups over consecutive ranks, each
with the sequences it runs and the cost model's estimate of its time."""

from __future__ import annotations

from dataclasses import dataclass


class InfeasibleError(ValueError):
    """A sequence that no group of the allowed degrees can hold."""


@dataclass(frozen=True)
class Group:
    degree: int
    ranks: tuple[int, ...]
    sequences: tuple[int, ...]
    """Indices into the step's lengths, ascending."""
    estimated_s: float


@dataclass(frozen=True)
class MicroBatch:
    groups: tuple[Group, ...]
    """Largest first, at consecutive ranks: each group starts at a multiple of its degree."""
    estimated_s: float
    """The slowest group's."""


@dataclass(frozen=True)
class SPPlan:
    devices: int
    micro_batches: tuple[MicroBatch, ...]
    estimated_s: float
    """The micro-batches' sum: they run one after another."""
    planning_ms: float = 0.0

    def to_json_dict(self) -> dict:
        return {"devices": self.devices, "estimated_s": self.estimated_s, "planning_ms": self.planning_ms,
                "micro_batches": [{"estimated_s": m.estimated_s, "groups": [
                    {"degree": g.degree, "ranks": list(g.ranks), "sequences": list(g.sequences)} for g in m.groups]}
                    for m in self.micro_batches]}


def total_s(micro_batches) -> float:
    return sum(mb.estimated_s for mb in micro_batches)
