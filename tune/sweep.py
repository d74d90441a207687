"""A sweep: a Ray Tune run whose trials are whole Flotilla trainers (tune.trial), a population actor that
makes the PBT / PB2 decisions (tune.pbt), and an MLflow parent run with one nested child run per trial.

    outcome = run_sweep(config, launch=orchestrator.launch.run_training, name="pbt-tiny-...",
                        connect=orchestrator.ray_connect.connect_ray, track=orchestrator.sweep_tracking.SweepRun)

The orchestrator hands in `launch` (the same function `flotilla train` uses), the Ray connection and the
MLflow parent run; this package never imports the orchestrator, nor MLflow. `config` is the orchestrator's
Config: the trainer sections plus `cluster`, `tracking` and `tune`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.config import absolute_paths
from tune.config import TuneConfig
from tune.lineage import Segment, best_trial, write_lineage
from tune.pbt import ExploitRecord, Hparams, initial_population
from tune.persistent import persistent_worker
from tune.population import PopulationActor, take_decision
from tune.timings import STARTUP_METRIC, SegmentTimes, Timings
from tune.trial import RESTORE_METRIC, plan_segment, segment_worker, stn_segment_worker


def with_hparams(config: Any, hparams: Hparams) -> Any:
    """A copy of `config` with each `section.key` (or `tune.stn.key` for `stn.key`) set, validated again."""
    data = config.model_dump()
    for key, value in hparams.items():
        section, name = key.split(".", 1)
        (data["tune"]["stn"] if section == "stn" else data[section])[name] = value
    return type(config).model_validate(data)


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str | None
    best_trial: str
    best_score: float
    segments: list[Segment]
    lineage: list[ExploitRecord]
    timings: Timings
    out_dir: Path
    final_scores: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None
    """The best trial's checkpoint at its last step (its weights, ready to load or to fine-tune)."""
    crashed: set[str] = field(default_factory=set)
    """Trials that failed (their errors are in Ray Tune's output); the others finished."""
    reuse_workers: bool = False
    """Each trial kept its workers for the whole sweep (tune.reuse_workers), or restarted them every segment."""


DRIVER_RESOURCES = {"CPU": 0, "memory": 1}
"""What each Tune trial (a driver that launches the trainer's segments) asks of Ray. The trial only drives:
the trainer's workers take the CPUs (cluster.cpus_per_worker each), so a driver waiting for a generation
never keeps a pending trial from running. No CPU at all: even a hundredth of one per driver left 1.96 of 2
CPUs with 4 trials, room for one 1-CPU worker instead of two, and trials ran one at a time. Tune refuses
an empty request; one byte of memory, a resource every Ray node has, is as good as none."""


REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
"""How often a trial's Ray Train controller collects its workers' reports (Ray's default: every 2 s). A worker's
report waits until the controller has collected the one before it, so at 2 s a trial reporting every second
(train.log_every, validation, the checkpoint at each decision) waited in most reports: on pbt-tiny with persistent
workers that was most of each segment's overhead: 2.1 s a segment at 2 s, 0.6 s at 0.25 s (2 busy cores)."""


def _persistent_trial(name: str, hparams: Hparams, *, base: Any, launch: Callable, population, trial_dir: Path,
                      tags: dict[str, str]) -> None:
    """One trainer for the whole trial: its workers run every segment and ask the population themselves."""
    from ray.tune.integration.ray_train import TuneReportCallback

    tune_cfg: TuneConfig = base.tune
    cfg = with_hparams(base, hparams)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": str(trial_dir)})})
    loop = functools.partial(
        persistent_worker, name=name, population=population, trial_dir=str(trial_dir), total=base.train.steps,
        interval=tune_cfg.segment_steps(base.train.steps), metric=tune_cfg.metric, hparams=dict(hparams),
        stn=cfg.tune.stn.model_dump() if tune_cfg.scheduler == "stn" else None, launched_at=time.time())
    launch(cfg, run_name=name, worker_loop=loop, callbacks=[TuneReportCallback()], tags=tags, log_models=False)


def _first(history: list[dict[str, Any]], key: str) -> Any:
    return next((h[key] for h in history if key in h), None)


def _trial_fn(params: dict, *, base: Any, launch: Callable, population, out_dir: Path, parent: str | None,
              tracking_uri: str, worker_loop: Callable = segment_worker, reuse_workers: bool = False) -> None:
    """The Tune trainable (a driver function): run the trial's segments, checking in after each."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Tune runs this in another process and directory
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)  # read when this process starts a TorchTrainer
    name, hparams = params["trial"], dict(params["hparams"])
    tune_cfg: TuneConfig = base.tune
    total = base.train.steps
    trial_dir = out_dir / name
    checkpoint, start, index, exploited = None, 0, 0, False
    tags = {"flotilla.sweep": out_dir.name, "flotilla.trial": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    interval = tune_cfg.segment_steps(total)
    try:
        if reuse_workers:
            _persistent_trial(name, hparams, base=base, launch=launch, population=population, trial_dir=trial_dir,
                              tags=tags)
            start = total
        while start < total:
            seg = plan_segment(trial_dir, index, start, interval, total)
            cfg = with_hparams(base, hparams)
            cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
                update={"dir": str(seg.storage), "every": interval})})
            stn = {"stn": cfg.tune.stn.model_dump()} if tune_cfg.scheduler == "stn" else {}
            queued = time.monotonic()
            while not ray.get(population.acquire.remote(name, seg.start)):
                time.sleep(0.5)
            began, launched_at = time.monotonic(), time.time()
            slot_s = began - queued
            try:
                outcome = launch(cfg, run_name=name, resume_from=checkpoint,
                                 worker_loop=functools.partial(worker_loop, stop_at=seg.stop, launched_at=launched_at,
                                                               **stn),
                                 callbacks=[TuneReportCallback()], tags=tags, log_models=False)
            finally:
                ray.get(population.release.remote(name))
            score, start_score = (next((h[tune_cfg.metric] for h in reversed(outcome.history)
                                        if tune_cfg.metric in h and h["step"] == at), None) for at in (seg.stop, seg.start))
            record = Segment(name, seg.start, seg.stop, hparams, score, outcome.checkpoint)
            ray.get(population.check_in.remote(name, record, start_score))
            # waits holding no training resources
            decision, next_checkpoint, wait_s = take_decision(population, name, trial_dir, seg.stop)
            startup = _first(outcome.history, STARTUP_METRIC) or 0.0
            train_s = sum(h.get("step_time_s", 0.0) for h in outcome.history if seg.start < h["step"] <= seg.stop)
            times = SegmentTimes(time.monotonic() - began - wait_s - startup, train_s, startup, wait_s + slot_s,
                                 _first(outcome.history, RESTORE_METRIC))
            ray.get(population.timed.remote(times, exploited))
            exploited, checkpoint = decision.exploit, next_checkpoint
            hparams = dict(decision.hparams)
            start, index = seg.stop, index + 1
    except BaseException:
        ray.get(population.leave.remote(name, True))
        raise
    ray.get(population.leave.remote(name, False))


def run_sweep(config: Any, *, launch: Callable, name: str, connect: Callable[[], None], track: Callable[[Any, str], Any],
              worker_loop: Callable | None = None) -> SweepOutcome:
    """Run the population to `train.steps`; returns the lineage, the best trial and the timings.

    `connect` starts or attaches Ray (the orchestrator's). `track(config, name)` makes the sweep's MLflow
    parent run (the orchestrator's SweepRun): `start()` returns its id (None while MLflow does not answer),
    `tracking_uri` is where the trials log, `finish_records(...)`, `log_best_model(checkpoint, step, trial)` and
    `close(status)` never raise. Trials log no model (`launch(..., log_models=False)`): the sweep logs the best's.
    `worker_loop` overrides the per-worker entry (default: tune.trial's segment_worker, or
    stn_segment_worker for scheduler = stn)."""
    import ray
    from ray import tune

    tune_cfg: TuneConfig = config.tune
    config = absolute_paths(config)  # trials run in Tune's processes, not in this directory
    out_dir = Path(config.checkpoint.dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{name}-t{i}" for i in range(tune_cfg.num_samples)]
    starts = dict(zip(names, initial_population(tune_cfg.mutations, tune_cfg.num_samples, tune_cfg.seed)))
    sweep_run = track(config, name)
    parent = sweep_run.start()

    connect()
    began = time.monotonic()
    per_trial = config.cluster.num_workers * config.cluster.cpus_per_worker
    slots = int(ray.cluster_resources().get("CPU", 1) // per_trial)
    if slots < 1:
        raise ValueError(f"a trial needs {per_trial:g} CPUs (cluster.num_workers x cluster.cpus_per_worker); "
                         f"the Ray cluster has {ray.cluster_resources().get('CPU', 0):g}")
    # a thread per trial worker waiting: rank 0 for the trial's decision, the other ranks for rank 0 to share it
    population = ray.remote(num_cpus=0, max_concurrency=len(names) * config.cluster.num_workers + 4)(
        PopulationActor).remote(names, tune_cfg.model_dump(), config.train.steps, slots)
    # Persistent workers cannot take turns: with more trials than the cluster runs at once, restart segments.
    reuse = tune_cfg.reuse_workers and worker_loop is None and tune_cfg.num_samples <= slots
    if tune_cfg.reuse_workers and not reuse and worker_loop is None:
        print(f"sweep {name}: segment restarts, not persistent workers (tune.reuse_workers): the cluster runs "
              f"{slots} of the {tune_cfg.num_samples} trials at once ({per_trial:g} CPUs each); persistent workers "
              "need them all at once (lower cluster.cpus_per_worker or tune.num_samples)")
    if worker_loop is None and tune_cfg.scheduler == "stn":
        worker_loop = stn_segment_worker
    options = {"base": config, "launch": launch, "population": population, "out_dir": out_dir, "parent": parent,
               "tracking_uri": sweep_run.tracking_uri, "reuse_workers": reuse,
               **({"worker_loop": worker_loop} if worker_loop else {})}

    def trainable(config):  # Tune wants a function of `config` alone
        return _trial_fn(config, **options)

    tuner = tune.Tuner(
        tune.with_resources(trainable, DRIVER_RESOURCES),
        param_space={"trial": tune.grid_search(names), "hparams": tune.sample_from(lambda config: starts[config["trial"]])},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=len(names)),
        run_config=tune.RunConfig(name=name, storage_path=str(out_dir / "tune"), verbose=0),
    )
    status = "FAILED"
    try:
        grid = tuner.fit()
        segments, lineage, timings, crashed = ray.get(population.records.remote())
        timings.wall_s = time.monotonic() - began
        if not segments:
            errors = [str(r.error).splitlines()[-1] for r in grid if r.error]
            raise RuntimeError(f"sweep {name}: no trial finished a segment ({'; '.join(errors[:2])})")
        best = best_trial(segments, tune_cfg.mode)
        last = max(s.stop for s in segments)
        finals = {s.trial: s.score for s in segments if s.stop == last and s.score is not None}
        write_lineage(out_dir / "lineage.json", segments, lineage, best)
        (out_dir / "timings.json").write_text(json.dumps({"reuse_workers": reuse, **timings.summary()}, indent=1))
        sweep_run.finish_records(segments, lineage, timings, best, finals, crashed, out_dir,
                                 list(tune_cfg.mutations))
        status = "FINISHED" if not crashed else "FAILED"
        best_checkpoint = next(s.checkpoint for s in segments if s.trial == best and s.stop == last)
        sweep_run.log_best_model(best_checkpoint, last, best)
        return SweepOutcome(name, parent, best, finals[best], segments, lineage, timings, out_dir,
                            final_scores=finals, best_checkpoint=best_checkpoint, crashed=crashed,
                            reuse_workers=reuse)
    finally:
        sweep_run.close(status)


def replay(config: Any, schedule: list[dict[str, Any]], *, launch: Callable, run_name: str,
           worker_loop: Callable = segment_worker) -> Any:
    """Train one plain run (one trainer, one MLflow run) through a sweep's schedule: each stretch of steps
    with its hyperparameters, continuing from the previous stretch's checkpoint."""
    config = absolute_paths(config)
    checkpoint, outcome = None, None
    run_dir = Path(config.checkpoint.dir) / run_name
    for i, part in enumerate(schedule):
        cfg = with_hparams(config, part["hparams"])
        every = config.tune.perturbation_interval if config.tune else part["stop"]
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
            update={"dir": str(run_dir / f"part_{i:03d}"), "every": every})})
        outcome = launch(cfg, run_name=run_name, resume_from=checkpoint,
                         worker_loop=functools.partial(worker_loop, stop_at=part["stop"]),
                         tags={"flotilla.replay_of": "sweep schedule"})
        checkpoint = outcome.checkpoint
    return outcome


__all__ = ["run_sweep", "replay", "with_hparams", "SweepOutcome", "Timings"]
