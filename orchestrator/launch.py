"""Run one training job on Ray: an embedded local Ray, or an existing cluster.

The driver starts a Ray Train `TorchTrainer` whose workers run `trainers.run.ray_train_loop`. Rank 0's
reports travel back to the driver (orchestrator.relay), which turns them into MLflow metrics
(orchestrator.run_tracking) and, through `on_report`, the terminal's progress line (orchestrator.progress).
The trained model (and with tracking.log_models = every, each checkpoint's) goes to MLflow as a LoggedModel
(orchestrator.model_logging).
"""

from __future__ import annotations

import functools
import logging
import queue as stdlib_queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.config import Config
from orchestrator.console import RAY_LOG_LEVEL
from orchestrator.data import prepare_data
from orchestrator.model_logging import ModelLogger
from orchestrator.placement import check_placement, worker_bundle
from orchestrator.ray_connect import connect_ray
from orchestrator.relay import RUN_LOG, ReportRelay, RunOutcome, failure_callback, relay_callback
from orchestrator.run_tracking import run_tracker


def run_training(config: Config, *, run_name: str, address: str | None = None, quiet: bool = False,
                 on_report: Callable[[list[dict[str, Any]]], None] | None = None,
                 resume_from: str | None = None, worker_loop: Callable[[dict[str, Any]], None] | None = None,
                 callbacks: list[Any] = (), tags: dict[str, str] | None = None, log_models: bool = True) -> RunOutcome:
    """Train `config` to the end (or resume run `run_name` from its latest checkpoint); returns the outcome.
    `address` and `quiet` are connect_ray's; `quiet` also keeps Ray Train's own log lines below ERROR, and
    the tracebacks of a worker failure, off the console (they go to the run's log, RUN_LOG in its storage).

    `on_report` sees each report of rank 0 as it arrives: the metrics of every step it covers (the CLI
    draws its progress line with it).

    For sweeps (tune.trial): `worker_loop` replaces `trainers.run.ray_train_loop` as each worker's entry;
    `resume_from` (a checkpoint directory) goes to it as payload["resume_from"], to start from when the
    run's own storage holds none (Ray Train V2 refuses `resume_from_checkpoint`; ray-project/ray#49454);
    `callbacks` are extra Ray Train callbacks (e.g. Ray Tune's TuneReportCallback); `tags` are
    added to the MLflow run's (e.g. mlflow.parentRunId); `log_models=False` logs no model whatever
    tracking.log_models says (a sweep's trials: the sweep logs its best trial's).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    config = prepare_data(config)
    connect_ray(address, quiet=quiet)
    # Before the MLflow run exists: a run no node can hold (in whole tensor-parallel groups) fails here at once,
    # instead of pending forever.
    check_placement(config.cluster, config.parallel.tp)
    tracker = run_tracker(config, run_name, tags or {})
    run_id = tracker.start()
    models = ModelLogger(config.tracking.log_models if log_models else "none", tracker, run_name, config.train.steps)

    # No CPU: inside a Ray Tune trial this actor lands in the trial's placement group, which holds none.
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _worker_entry if worker_loop is None else functools.partial(_worker_entry, loop=worker_loop),
        train_loop_config={"trainer": config.trainer_sections(), "use_gpu": config.cluster.use_gpu,
                           **({"resume_from": resume_from} if resume_from else {})},
        torch_config=TorchConfig(backend="nccl" if config.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu,
                                     resources_per_worker=worker_bundle(config.cluster)),
        run_config=RunConfig(name=run_name, storage_path=config.checkpoint.dir,
                             failure_config=FailureConfig(max_failures=config.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
                             # Quiet: not Ray Train's warnings, e.g. the traceback of its controller's failed
                             # ray.get on a killed worker; the relay's line says what failed.
                             logging_config=LoggingConfig(log_level=RAY_LOG_LEVEL if quiet else "WARNING"),
                             callbacks=[relay_callback(reports), failure_callback(reports), *callbacks]),
    )
    outcome = RunOutcome(run_name, run_id, {})
    finished: dict[str, Any] = {}
    fit = threading.Thread(target=lambda: finished.update(result=_fit(trainer)), daemon=True)
    fit.start()
    status = "FAILED"
    try:
        relay = ReportRelay(tracker, outcome, on_report, config.cluster.max_failures, on_checkpoint=models.checkpoint,
                            log=Path(config.checkpoint.dir) / run_name / RUN_LOG, verbose=not quiet)
        while fit.is_alive() or not reports.empty():
            try:
                relay(reports.get(timeout=0.5))
            except (stdlib_queue.Empty, ray.util.queue.Empty):
                continue
        result = finished["result"]
        if isinstance(result, BaseException):
            raise result
        if result.error:
            raise result.error
        outcome.checkpoint = result.checkpoint.path if result.checkpoint else None
        if outcome.history:
            models.final(outcome.checkpoint, int(outcome.history[-1]["step"]))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
        outcome.mlflow_run_id = tracker.run_id
    return outcome


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # handed to the driver's thread, which raises it
        return err


def _worker_entry(payload: dict[str, Any], loop: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Each Ray Train worker's entry: `loop` (default trainers.run.ray_train_loop), on a console kept quiet."""
    # Ray Train 2.60 logs every report at INFO through a logger named by its file path, outside the
    # `ray.train` tree that LoggingConfig filters, so only the worker's root level keeps it off the console.
    logging.getLogger().setLevel(logging.WARNING)
    # Ray Train logs the training code's exception with its traceback on the worker's console, on the ranks that
    # failed only because another died too; the driver shows it where it caused the failure (orchestrator.relay).
    for handler in logging.getLogger("ray.train").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not Ray's session log files
            handler.addFilter(_not_the_training_error)
    if loop is None:
        from trainers.run import ray_train_loop as loop
    loop(payload)


def _not_the_training_error(record: logging.LogRecord) -> bool:
    return record.funcName != "construct_user_exception_with_traceback"  # ray.train.v2._internal.util
