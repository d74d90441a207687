"""One trial of a sweep: a whole Flotilla trainer, run in segments of `tune.perturbation_interval` steps.

Ray's guidance for Ray Train under Ray Tune (Train V2): the Tune trainable is a driver function that
launches a TorchTrainer with Ray Tune's `TuneReportCallback`, so every report of the trainer reaches
Tune. Between segments the driver function holds no training resources; it checks in with the population
(tune.pbt.Population behind a Ray actor) and starts the next segment from the checkpoint the decision names:
its own, or a copy of the donor's, with the decided hyperparameters.

Two worker-side rules make restores correct (`segment_worker`):
- each segment writes to fresh Ray Train storage, so `ray.train.get_checkpoint()` can only return the
  checkpoint the driver passed (`resume_from`), never the trial's own stale one;
- after a restore, the optimizer hyperparameters the config decides (weight decay, betas, eps) are put back
  (trainers.loop.restore_keeping_config_hparams): a torch optimizer's state_dict carries its param groups,
  and loading it silently brings back the old (pre-perturbation) values. The learning rate is set by the
  loop from the config each step.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.checkpoint import TrainState
from trainers.reporter import RayReporter, Reporter
from tune.timings import STARTUP_METRIC

RESTORE_METRIC = "pbt/restore_s"
"""Seconds the worker spent restoring the checkpoint it started from (reported with the segment's first report)."""


class SegmentDone(Exception):
    """Raised by `StopAtReporter` on every rank once the checkpoint at the segment's end is reported."""


class TimedLoad:
    """Wraps an engine to time `load` (the restore at a segment's start, measured for the sweep's exploit
    overhead). Keeping the config's optimizer hyperparameters over the checkpoint's is the loop's own
    `restore_keeping_config_hparams`, which calls this `load`."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.restore_seconds: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load(self, path: Path) -> TrainState:
        started = time.perf_counter()
        state = self._engine.load(path)
        self.restore_seconds = time.perf_counter() - started
        return state


class ResumeFromReporter:
    """Ray Train's checkpoint of this run if it has one (a restarted worker group), else `resume_from`:
    Ray Train V2's replacement for `resume_from_checkpoint` (ray-project/ray#49454)."""

    def __init__(self, inner: Reporter, resume_from: str | None):
        self.inner, self.resume_from = inner, resume_from

    def latest_checkpoint(self):
        import contextlib

        own = self.inner.latest_checkpoint()
        if self.resume_from is None:
            return own

        @contextlib.contextmanager
        def pick():
            with own as path:
                yield path if path is not None else Path(self.resume_from)

        return pick()

    def report(self, steps, checkpoint_dir=None):
        self.inner.report(steps, checkpoint_dir)


def with_first_report(steps: list[dict[str, Any]], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """`steps` with `extra` added to the last step's metrics (what Ray and Tune see of a report)."""
    return [*steps[:-1], {**steps[-1], **extra}] if extra else steps


class StopAtReporter:
    """A reporter that ends the segment after the checkpointed report at or past `stop_at`, and adds the
    start-up (`startup_s`, when measured) and restore times to the first report."""

    def __init__(self, inner: Reporter, stop_at: int, engine: TimedLoad, startup_s: float | None = None):
        self.inner, self.stop_at, self.engine = inner, stop_at, engine
        self._first = {STARTUP_METRIC: startup_s} if startup_s is not None else {}
        self._restore_logged = False

    def latest_checkpoint(self):
        return self.inner.latest_checkpoint()

    def report(self, steps: list[dict[str, Any]], checkpoint_dir: Path | None = None) -> None:
        extra, self._first = self._first, {}
        if not self._restore_logged and self.engine.restore_seconds is not None:
            extra = {**extra, RESTORE_METRIC: self.engine.restore_seconds}
            self._restore_logged = True
        self.inner.report(with_first_report(steps, extra), checkpoint_dir)
        if checkpoint_dir is not None and steps[-1]["step"] >= self.stop_at:
            raise SegmentDone


def run_segment(cfg, reporter: Reporter, stop_at: int, use_gpu: bool = False, build=None, loop=None,
                launched_at: float | None = None) -> None:
    """Build the trainer for `cfg`, restore (keeping the config's hyperparameters) and train to `stop_at`.
    `build` and `loop` default to trainers.run.build and trainers.loop.train; STN trials pass trainers.stn's.
    `launched_at` (time.time() when the driver launched the segment) has the start-up reported."""
    from trainers.loop import train
    from trainers.run import build as default_build

    trainee = (build or default_build)(cfg, use_gpu)
    trainee.engine = TimedLoad(trainee.engine)
    startup = time.time() - launched_at if launched_at is not None else None
    try:
        (loop or train)(trainee, StopAtReporter(reporter, stop_at, trainee.engine, startup))
    except SegmentDone:
        pass


def segment_worker(payload: dict[str, Any], stop_at: int, launched_at: float | None = None) -> None:
    """Ray Train's `train_loop_per_worker` for one segment of a PBT trial."""
    import logging

    from trainers.config import TrainerConfig

    logging.getLogger().setLevel(logging.WARNING)
    reporter = ResumeFromReporter(RayReporter(), payload.get("resume_from"))
    run_segment(TrainerConfig.model_validate(payload["trainer"]), reporter, stop_at, payload["use_gpu"],
                launched_at=launched_at)


def stn_segment_worker(payload: dict[str, Any], stop_at: int, stn: dict[str, Any],
                       launched_at: float | None = None) -> None:
    """Ray Train's `train_loop_per_worker` for one segment of an STN trial; `stn` is the trial's
    tune.stn settings (PBT may have changed hyper_lr / perturb_scale since the last segment)."""
    import functools
    import logging

    from trainers import stn as stn_trainer
    from trainers.config import TrainerConfig
    from tune.config import STNSettings

    logging.getLogger().setLevel(logging.WARNING)
    settings = STNSettings.model_validate(stn)
    reporter = ResumeFromReporter(RayReporter(), payload.get("resume_from"))
    run_segment(TrainerConfig.model_validate(payload["trainer"]), reporter, stop_at, payload["use_gpu"],
                build=functools.partial(stn_trainer.build, settings=settings),
                loop=functools.partial(stn_trainer.train, settings=settings), launched_at=launched_at)


def copy_checkpoint(src: str, dst: Path) -> float:
    """Copy a donor's checkpoint into the recipient's own folder (the donor rotates its checkpoints and
    may delete this one while the recipient still needs it); returns the seconds it took."""
    started = time.perf_counter()
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return time.perf_counter() - started


@dataclass
class SegmentPlan:
    """Where segment `index` of a trial starts and stops, and where its Ray Train storage goes."""

    index: int
    start: int
    stop: int
    storage: Path


def plan_segment(trial_dir: Path, index: int, start: int, interval: int, total: int) -> SegmentPlan:
    """Segments end on multiples of `interval` (where the trial checkpoints and validates) or at `total`.
    Each gets its own storage folder: a Ray Train run finding checkpoints in its storage would resume
    from those instead of the checkpoint it is given."""
    stop = min(total, (start // interval + 1) * interval)
    return SegmentPlan(index, start, stop, trial_dir / f"segment_{index:03d}")
