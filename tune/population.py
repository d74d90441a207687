"""The population's Ray actor: tune.pbt.Population (the pure decisions) behind one actor every trial talks to,
with the sweep's records (segments, lineage, timings) and the admission of segments to the cluster (Slots)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tune.config import TuneConfig
from tune.lineage import Segment
from tune.pbt import Decision, ExploitRecord, Population, Slots
from tune.timings import SegmentTimes, Timings
from tune.trial import copy_checkpoint


class PopulationActor:
    """The Ray actor holding the population (tune.pbt.Population) and the sweep's records. Threaded (Ray's
    max_concurrency): trials block in `decision` until theirs is made, instead of polling for it."""

    def __init__(self, names: list[str], cfg: dict, total_steps: int, slots: int):
        self.population = Population(names, TuneConfig.model_validate(cfg), total_steps)
        self.slots = Slots(slots)
        self.segments: list[Segment] = []
        self.timings = Timings()
        self.changed = threading.Condition()
        self.shared: dict[tuple[str, int], dict] = {}  # (trial, step) -> the decision its rank 0 acted on

    def check_in(self, name: str, segment: Segment, start_score: float | None = None) -> None:
        with self.changed:
            # a trial restarted after a crash may check in a segment again: recorded once
            self.segments = [s for s in self.segments if (s.trial, s.stop) != (name, segment.stop)] + [segment]
            score = segment.score if segment.score is not None else float("nan")
            started = (segment.start, start_score) if start_score is not None else None
            self.population.check_in(name, segment.stop, score, segment.checkpoint, segment.hparams, time.monotonic(),
                                     started)
            self.changed.notify_all()

    def _wait_for(self, ready: Callable[[], Any], timeout_s: float, tick_s: float = math.inf) -> Any:
        """ready() once it is not None, waiting on `changed` up to `timeout_s` (None if not by then) and waking at
        least every `tick_s`. The caller holds the lock."""
        deadline = time.monotonic() + timeout_s
        while (value := ready()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.wait(min(left, tick_s))
        return value

    def decision(self, name: str, timeout_s: float = 10.0) -> Decision | None:
        """The trial's decision, waiting up to `timeout_s` for it (None if it is not made by then). Wakes at
        least every few seconds to let the population declare stalled trials crashed."""
        with self.changed:
            decision = self._wait_for(lambda: self.population.decision(name, time.monotonic()), timeout_s, tick_s=5.0)
            if decision is not None:
                self.changed.notify_all()  # deciding may have released a generation others wait for
            return decision

    def share(self, name: str, step: int, decision: dict) -> None:
        """Rank 0 of a multi-worker trial hands the decision it took at `step` (checkpoint in the trial's folder,
        hyperparameters) to the trial's other ranks."""
        with self.changed:
            self.shared[(name, step)] = decision
            self.changed.notify_all()

    def shared_decision(self, name: str, step: int, timeout_s: float = 10.0) -> dict | None:
        """What rank 0 of `name` decided at `step`, waiting up to `timeout_s` for it (None if not shared by then)."""
        with self.changed:
            return self._wait_for(lambda: self.shared.get((name, step)), timeout_s)

    def timed(self, times: SegmentTimes, exploited: bool) -> None:
        with self.changed:
            self.timings.add(times, exploited)

    def acquire(self, name: str, step: int) -> bool:
        with self.changed:
            return self.slots.acquire(name, step, time.monotonic())

    def release(self, name: str) -> None:
        with self.changed:
            self.slots.release(name)

    def copied(self, seconds: float) -> None:
        with self.changed:
            self.timings.copy_s += seconds

    def leave(self, name: str, crashed: bool) -> None:
        with self.changed:
            self.slots.release(name)
            self.population.leave(name, crashed)
            self.changed.notify_all()

    def records(self) -> tuple[list[Segment], list[ExploitRecord], Timings, set[str]]:
        with self.changed:
            return self.segments, self.population.lineage, self.timings, self.population.crashed


def take_decision(population, name: str, trial_dir: Path, step: int) -> tuple[Decision, str | None, float]:
    """Block until the population actor has this trial's decision (a synchronous generation waits here); on
    exploit, copy the donor's checkpoint into the trial's folder. Returns the decision, the checkpoint to go on
    from and the seconds spent waiting. Both trial kinds (tune.sweep's drivers, tune.persistent's workers)."""
    import ray

    waited = time.monotonic()
    while (decision := ray.get(population.decision.remote(name))) is None:
        pass
    wait_s = time.monotonic() - waited
    if not decision.exploit:
        return decision, decision.checkpoint, wait_s
    local = trial_dir / f"exploit_{step:06d}_from_{decision.donor}"
    ray.get(population.copied.remote(copy_checkpoint(decision.checkpoint, local)))
    return decision, str(local), wait_s
