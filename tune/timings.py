"""Where a sweep's time goes: each segment's start-up, training steps, overhead, exploit and generation wait,
summed over the sweep. Both trial kinds measure the same things (tune.persistent's workers and tune.sweep's
segment-restart drivers), so the two can be compared line by line (bench/sweep_overhead.py).

Every sum is in trial-seconds: trials run side by side, so a sum can exceed the sweep's wall time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STARTUP_METRIC = "pbt/startup_s"
"""Seconds from the trial's launch call to its trainee being built (Ray Train start-up, process group, model
build), reported with the first report after it."""


@dataclass
class SegmentTimes:
    """One segment of one trial, in seconds."""

    wall_s: float
    """From the segment's start to the next decision in hand (check-in, copying a donor's checkpoint), with the
    start-up and the wait below left out."""
    train_s: float
    """Its training steps' own time (each step's step_time_s): wall_s minus this is the segment's overhead
    (validation, checkpoint writes, reports, restores, rebuilds, check-in)."""
    startup_s: float = 0.0
    """Start-up before the segment: every segment with segment restarts, the first only with persistent workers."""
    wait_s: float = 0.0
    """Waiting for the synchronous generation (or, with segment restarts, for a free slot)."""
    restore_s: float | None = None
    """Loading the checkpoint it started from; None when it started fresh or went on in place."""


@dataclass
class Timings:
    """The sweep's wall time and its trials' segments summed."""

    wall_s: float = 0.0
    segments: int = 0
    segment_wall_s: float = 0.0
    train_s: float = 0.0
    startup_s: float = 0.0
    startups: int = 0
    wait_s: float = 0.0
    copy_s: float = 0.0
    """Copying donors' checkpoints into the recipients' folders."""
    restore_after_exploit_s: float = 0.0
    restore_own_s: float = 0.0

    def add(self, times: SegmentTimes, exploited: bool) -> None:
        """Count one segment; `exploited`: it started from a donor's checkpoint."""
        self.segments += 1
        self.segment_wall_s += times.wall_s
        self.train_s += times.train_s
        self.wait_s += times.wait_s
        if times.startup_s:
            self.startup_s += times.startup_s
            self.startups += 1
        if times.restore_s is not None:
            if exploited:
                self.restore_after_exploit_s += times.restore_s
            else:
                self.restore_own_s += times.restore_s

    @property
    def overhead_per_segment_s(self) -> float:
        """Mean segment wall minus its training steps, start-up and generation wait left out."""
        return (self.segment_wall_s - self.train_s) / self.segments if self.segments else 0.0

    @property
    def startup_per_segment_s(self) -> float:
        """Start-up spread over the segments: the per-segment cost segment restarts pay and persistent workers
        pay once per trial."""
        return self.startup_s / self.segments if self.segments else 0.0

    @property
    def exploit_s(self) -> float:
        return self.copy_s + self.restore_after_exploit_s

    @property
    def exploit_fraction(self) -> float:
        return self.exploit_s / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, float]:
        """Every sum and the derived figures, for timings.json beside the sweep's lineage."""
        return {**asdict(self), "overhead_per_segment_s": self.overhead_per_segment_s,
                "startup_per_segment_s": self.startup_per_segment_s, "exploit_s": self.exploit_s,
                "exploit_fraction": self.exploit_fraction}
