"""A trial whose worker group lives for the whole sweep (tune.reuse_workers = true).

The driver (tune.sweep._trial_fn) launches ONE trainer per trial with `persistent_worker` as each worker's
entry. The workers build the trainee once and train segment after segment: at each segment's end rank 0
writes the segment-end checkpoint into the trial's folder, checks in with the population actor, waits for
its decision (a synchronous generation waits here, holding the workers) and shares it through the actor
(`share_decision`: no collective held during the wait), so every rank does the same: continue from its own
checkpoint, or from a copy of the donor's, with the decided hyperparameters. No Ray Train start-up,
process-group set-up or (unless a hyperparameter needs it) model build between segments: DeepMind's PBT,
which exploits by loading weights into running workers.

The segment-end checkpoints are written by the workers themselves at a stable path
(`<trial dir>/ckpt_<step>`), which the population hands to other trials: on a real cluster
checkpoint.dir must therefore be shared storage, as the workers of another trial read it.

Going on from its own checkpoint loads nothing (`InPlaceEngine`): the trainee already holds that state. Those
checkpoints are not handed to Ray Train either (it would persist a second copy that nothing reads).

A crashed worker group (Ray Train's FailureConfig.max_failures, cluster.max_failures) calls this entry again:
it continues from `<trial dir>/resume.json`, which rank 0 rewrites after each decision (the checkpoint, own or
the donor's copy, the step and the hyperparameters), and rejoins the population. Its first report carries the
step it resumed from, so the trial's MLflow run records the restart as `flotilla train` records one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from trainers.checkpoint import TrainState, read_rank_state
from trainers.reporter import RESUMED_FROM
from tune.lineage import Segment
from tune.population import take_decision
from tune.timings import STARTUP_METRIC, SegmentTimes
from tune.trial import RESTORE_METRIC, SegmentDone, TimedLoad, with_first_report

IN_PLACE = {"optim.lr"}
"""Hyperparameters a running trainee takes without a rebuild: the loop sets the learning rate from the
config every step. Any other change (a dropout the model's modules hold, a weight decay in the optimizer's
param groups, an STN setting) rebuilds the trainee, in the same worker processes."""


def trainer_with_hparams(trainer: dict[str, Any], stn: dict[str, Any] | None, hparams: dict[str, Any]):
    """The trainer sections (a TrainerConfig dump) and STN settings with each `section.key` set."""
    trainer, stn = json.loads(json.dumps(trainer)), dict(stn or {})
    for key, value in hparams.items():
        section, name = key.split(".", 1)
        (stn if section == "stn" else trainer[section])[name] = value
    return trainer, stn


def needs_rebuild(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether going from hyperparameters `old` to `new` changes anything the trainee holds (IN_PLACE aside)."""
    return any(old.get(k) != new.get(k) for k in set(old) | set(new) if k not in IN_PLACE)


class InPlaceEngine(TimedLoad):
    """The trainee's engine, knowing which checkpoint holds exactly the state it is in (`held`: the one it
    wrote at the end of the last segment). Going on from that checkpoint loads nothing but the step to
    continue from: the weights, optimizer and RNG states in memory are the ones written there. Any other
    checkpoint (a donor's) is loaded as usual, and timed."""

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.held: Path | None = None

    def load(self, path: Path) -> TrainState:
        if self.held is not None and Path(path) == self.held:
            self.restore_seconds = None
            return read_rank_state(Path(path))
        return super().load(path)


class SegmentEndReporter:
    """Passes reports on to Ray Train (so MLflow sees every step) and ends the segment at `stop_at`: the
    checkpoint reported there is written, complete, to `keep_at` (rank 0 renames it into place once every
    rank's part is in) and goes no further. Remembers the metric at each step, sums the steps' own time and
    adds `first` (start-up, a restart's resumed step) and the restore time to the segment's first report."""

    def __init__(self, inner, resume_from: str | None, stop_at: int, keep_at: Path, engine: TimedLoad, metric: str,
                 first: dict[str, Any]):
        self.inner, self.resume_from, self.stop_at, self.keep_at = inner, resume_from, stop_at, keep_at
        self.engine, self.metric, self.first = engine, metric, first
        self.scores: dict[int, float] = {}
        self.train_s = 0.0
        self._restore_logged = False

    def latest_checkpoint(self):
        return contextlib.nullcontext(Path(self.resume_from) if self.resume_from else None)

    def report(self, steps, checkpoint_dir=None):
        extra, self.first = self.first, {}
        if not self._restore_logged and self.engine.restore_seconds is not None:
            extra = {**extra, RESTORE_METRIC: self.engine.restore_seconds}
            self._restore_logged = True
        for m in steps:
            if self.metric in m:
                self.scores[m["step"]] = m[self.metric]
            self.train_s += m.get("step_time_s", 0.0)
        done = checkpoint_dir is not None and steps[-1]["step"] >= self.stop_at
        if done:
            _keep(Path(checkpoint_dir), self.keep_at)
        self.inner.report(with_first_report(steps, extra))
        if done:
            raise SegmentDone


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _keep(part: Path, dst: Path) -> None:
    """Collective: every rank's part of a checkpoint into `dst`, renamed into place when complete."""
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    staging = dst.with_name(f".staging_{dst.name}")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        staging.mkdir(parents=True)
    if dist:
        dist.barrier()
    for f in part.iterdir():
        shutil.copy2(f, staging / f.name)
    if dist:
        dist.barrier()
    if rank == 0:
        staging.rename(dst)
    if dist:
        dist.barrier()


def share_decision(population, name: str, step: int, decision: dict[str, Any] | None) -> dict[str, Any]:
    """Every rank gets the decision rank 0 took at `step` (rank 0 passes it, the others None). Through the
    population actor, not a collective: a synchronous generation can keep rank 0 waiting for longer than the
    process group's timeout (Ray Train's 30 minutes), and ranks blocked in a broadcast all that time would fail
    the trial. The group's next collective (the first training step) brings the ranks back together."""
    import ray

    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return decision
    if dist.get_rank() == 0:
        ray.get(population.share.remote(name, step, decision))
        return decision
    while (shared := ray.get(population.shared_decision.remote(name, step))) is None:
        pass
    return shared


def persistent_worker(payload: dict[str, Any], *, name: str, population, trial_dir: str, total: int,
                      interval: int, metric: str, hparams: dict[str, Any], stn: dict[str, Any] | None = None,
                      launched_at: float | None = None) -> None:
    """Ray Train's `train_loop_per_worker` for a whole PBT trial (every segment, every decision).
    `launched_at`: time.time() when the driver launched the trial, to measure its start-up."""
    import functools
    import logging

    import ray

    from trainers import loop as train_loop
    from trainers import run as trainer_run
    from trainers.config import TrainerConfig
    from trainers.reporter import RayReporter

    logging.getLogger().setLevel(logging.WARNING)
    trial = Path(trial_dir)
    rank0 = (_dist().get_rank() if _dist() else 0) == 0
    resume = trial / "resume.json"
    state = {"start": 0, "checkpoint": payload.get("resume_from"), "hparams": hparams, "exploited": False}
    first: dict[str, Any] = {}
    if resume.exists():  # a restarted worker group: continue where the last decision left the trial
        state = json.loads(resume.read_text())
        first[RESUMED_FROM] = state["start"]
        launched_at = None  # its start-up is the restart's, not the launch's
    start, checkpoint, hparams, exploited = state["start"], state["checkpoint"], state["hparams"], state["exploited"]

    def config(hp) -> tuple[TrainerConfig, dict[str, Any]]:
        trainer, settings = trainer_with_hparams(payload["trainer"], stn, hp)
        trainer["checkpoint"]["every"] = interval
        return TrainerConfig.model_validate(trainer), settings

    def build(hp):
        cfg, settings = config(hp)
        if stn is None:
            return trainer_run.build(cfg, payload["use_gpu"]), cfg, train_loop.train
        from trainers import stn as stn_trainer
        from tune.config import STNSettings

        s = STNSettings.model_validate(settings)
        return (stn_trainer.build(cfg, payload["use_gpu"], settings=s), cfg,
                functools.partial(stn_trainer.train, settings=s))

    trainee, cfg, train, built_for, startup = None, None, None, None, 0.0
    while start < total:
        began = time.monotonic()
        if trainee is None or needs_rebuild(built_for, hparams):
            trainee, cfg, train = build(hparams)
            trainee.engine, built_for = InPlaceEngine(trainee.engine), dict(hparams)
            if launched_at is not None:  # the first build ends the trial's start-up
                startup = first[STARTUP_METRIC] = time.time() - launched_at
                began, launched_at = time.monotonic(), None
        else:
            cfg, _ = config(hparams)
        trainee.cfg = cfg
        engine: InPlaceEngine = trainee.engine
        engine.restore_seconds = None
        stop = min(total, (start // interval + 1) * interval)
        keep_at = trial / f"ckpt_{stop:06d}"
        reporter = SegmentEndReporter(RayReporter(), checkpoint, stop, keep_at, engine, metric, first)
        first = {}
        try:
            train(trainee, reporter)
        except SegmentDone:
            pass
        engine.held = keep_at
        decision, wait_s = None, 0.0
        if rank0:
            record = Segment(name, start, stop, dict(hparams), reporter.scores.get(stop), str(keep_at))
            ray.get(population.check_in.remote(name, record, reporter.scores.get(start)))
            d, checkpoint, wait_s = take_decision(population, name, trial, stop)  # workers kept while it waits
            decision = {"start": stop, "checkpoint": checkpoint, "hparams": dict(d.hparams), "exploited": d.exploit}
            written = resume.with_suffix(".json.tmp")
            written.write_text(json.dumps(decision))
            written.replace(resume)  # whole or not at all: a restart reads it
        decision = share_decision(population, name, stop, decision)
        if rank0:
            times = SegmentTimes(time.monotonic() - began - wait_s, reporter.train_s, startup, wait_s, engine.restore_seconds)
            ray.get(population.timed.remote(times, exploited))
        startup = 0.0
        start, checkpoint, hparams, exploited = (decision["start"], decision["checkpoint"], decision["hparams"],
                                                 decision["exploited"])
