"""Run one training job on Ray: an embedded local Ray, or an existing cluster.

The driver starts a Ray Train `TorchTrainer` whose workers run `trainers.run.ray_train_loop`. Rank 0's
reports travel back through a Ray queue (a Ray Train callback on the controller puts them there), and
the driver turns them into MLflow metrics and the terminal's progress line.
"""

from __future__ import annotations

import os
import queue as stdlib_queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import Config
from orchestrator.jobs import JOB_ID_ENV
from orchestrator.mlflow_client import loggable_params
from orchestrator.placement import check_placement, worker_bundle
from orchestrator.plan import format_plan, make_plan
from orchestrator.tracking import Tracker
from trainers.config import absolute_paths
from trainers.corpus import ensure_stdlib_dataset
from trainers.parallel.mesh import ParallelDims
from trainers.reporter import CHECKPOINT_STEPS, HISTORY, RESUMED_FROM, SKIPPED_CHECKPOINTS


@dataclass
class RunOutcome:
    run_name: str
    mlflow_run_id: str | None
    metrics: dict[str, Any]
    """The last report of rank 0 (with `val_loss` from the last validation)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every step's metrics once, in step order (steps a restarted worker group did again are not repeated)."""
    checkpoint: str | None = None
    """Where the run's latest persisted checkpoint is (None if it wrote none)."""
    restarts: list[int] = field(default_factory=list)
    """The step each restart of the worker group (after a worker failed) continued from."""


def default_run_name(config_path: str | Path) -> str:
    return f"{Path(config_path).stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def git_revision() -> str | None:
    """The revision of the Flotilla code that runs (its checkout, not the working directory's)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to `address` (or RAY_ADDRESS), else start an embedded local Ray for this process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            # A cluster with token authentication ignores a driver without its token: Ray then reports only
            # that it could not connect.
            raise ConnectionError(f"{err}. If the cluster uses token authentication, set RAY_AUTH_MODE=token and "
                                  "RAY_AUTH_TOKEN to its token (`ray get-auth-token` on the head node prints it)") from None
    else:
        # Token auth protects a shared cluster; an embedded single-user Ray on loopback has no one to keep out.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls; on loopback only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 configure_logging=True, logging_level="WARNING")


def prepare_data(config: Config) -> Config:
    """Make every path absolute (Ray workers do not run in the driver's working directory) and build the
    stdlib dataset here, once, rather than racing to build it in every worker."""
    config = absolute_paths(config)
    data = config.data
    if data.source == "stdlib":
        built = ensure_stdlib_dataset(Path(data.path), data.tokenizer, data.val_fraction, config.train.seed)
        config = config.model_copy(update={"data": data.model_copy(update={"path": str(built.path), "source": "parquet"})})
    return config


def run_training(config: Config, *, run_name: str, address: str | None = None,
                 on_report: Callable[[list[dict[str, Any]]], None] | None = None,
                 resume_from: str | None = None, worker_loop: Callable[[dict[str, Any]], None] | None = None,
                 callbacks: list[Any] = (), tags: dict[str, str] | None = None) -> RunOutcome:
    """Train `config` to the end (or resume run `run_name` from its latest checkpoint); returns the outcome.

    `on_report` sees each report of rank 0 as it arrives: the metrics of every step it covers (the CLI
    draws its progress line with it).

    For sweeps (tune.trial): `worker_loop` replaces `trainers.run.ray_train_loop` as each worker's entry;
    `resume_from` (a checkpoint directory) goes to it as payload["resume_from"], to start from when the
    run's own storage holds none (Ray Train V2 refuses `resume_from_checkpoint`; ray-project/ray#49454);
    `callbacks` are extra Ray Train callbacks (e.g. Ray Tune's TuneReportCallback); `tags` are
    added to the MLflow run's (e.g. mlflow.parentRunId).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    config = prepare_data(config)
    storage = Path(config.checkpoint.dir)
    dims = ParallelDims.from_config(config.parallel, config.cluster.num_workers)
    tags = {"flotilla.layout": dims.layout(), "flotilla.engine": config.parallel.engine,
            "ray.run_name": run_name, "flotilla.storage": str(storage / run_name), **(tags or {})}
    if rev := git_revision():
        tags["git.revision"] = rev
    if job := os.environ.get(JOB_ID_ENV):
        tags["ray.job_id"] = job
    connect_ray(address)
    # Before the MLflow run exists: a run no node can hold fails here at once, instead of pending forever.
    check_placement(config.cluster)
    resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    tracker = Tracker(config.tracking.experiment, run_name, loggable_params(config.model_dump(mode="json")), tags,
                      {"config.yaml": resolved, "plan.txt": format_plan(make_plan(config))}, outbox=storage / run_name / "mlflow-outbox.jsonl",
                      system_metrics_interval=config.tracking.system_metrics_interval if config.tracking.system_metrics else None)
    run_id = tracker.start()

    # No CPU: inside a Ray Tune trial this actor lands in the trial's placement group, which holds none.
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _worker_entry if worker_loop is None else worker_loop,
        train_loop_config={"trainer": config.trainer_sections(), "use_gpu": config.cluster.use_gpu,
                           **({"resume_from": resume_from} if resume_from else {})},
        torch_config=TorchConfig(backend="nccl" if config.cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu,
                                     resources_per_worker=worker_bundle(config.cluster)),
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=config.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
                             logging_config=LoggingConfig(log_level="WARNING"),
                             callbacks=[_relay_callback(reports), *callbacks]),
    )
    outcome = RunOutcome(run_name, run_id, {})
    finished: dict[str, Any] = {}
    fit = threading.Thread(target=lambda: finished.update(result=_fit(trainer)), daemon=True)
    fit.start()
    status = "FAILED"
    try:
        relay = ReportRelay(tracker, outcome, on_report, config.cluster.max_failures)
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
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
        outcome.mlflow_run_id = tracker.run_id
    return outcome


WORKER_FAILURE = "flotilla.worker_failure"
"""Key of a relayed message saying which workers failed (Ray Train's after_exception), instead of a report."""

RESTARTS = "restarts"
"""MLflow metric: the number of worker-group restarts so far, logged at the step the restart continued from."""


class ReportRelay:
    """The driver's side of the report queue: each step to the outcome and MLflow once, and restarts recorded.

    When a worker dies, Ray Train (FailureConfig.max_failures) starts a new worker group that continues from
    the run's latest checkpoint and does again the steps after it. Those steps were already logged: they are
    not logged twice (an exact resume computes the same values). The restart itself is logged as the metric
    `restarts` at the step it continued from (the worker's first report says which: RESUMED_FROM)."""

    def __init__(self, tracker: Tracker, outcome: RunOutcome, on_report: Callable | None, max_failures: int):
        self.tracker, self.outcome, self.on_report, self.max_failures = tracker, outcome, on_report, max_failures
        self.failed = False

    def _log(self, step: dict[str, Any]) -> None:
        self.tracker.log_metrics({k: v for k, v in step.items() if k != "step"}, step=int(step["step"]))

    def __call__(self, report: dict[str, Any]) -> None:
        if WORKER_FAILURE in report:
            self.failed = True
            print(f"worker failure ({report[WORKER_FAILURE]}); Ray Train restarts the workers from the last "
                  f"checkpoint if cluster.max_failures (= {self.max_failures}) allows", flush=True)
            return
        steps = report.get(HISTORY, [report])
        resumed = steps[0].pop(RESUMED_FROM, None)
        for warning in steps[0].pop(SKIPPED_CHECKPOINTS, []):
            print(f"warning: {warning}", flush=True)
        # The steps reported with the checkpoint the workers resumed from: a driver that died (a stopped job)
        # may not have logged them; the tracker drops those it has.
        for step in steps[0].pop(CHECKPOINT_STEPS, []):
            self._log(step)
        if resumed is not None:
            # Logged apart from its step's metrics: that step was often logged before the restart (or by the
            # driver before a resubmit) and is not sent again.
            self.tracker.log_metrics({RESUMED_FROM: resumed}, step=int(resumed), once_per_step=False)
        if self.failed:
            self.failed = False
            self.outcome.restarts.append(int(resumed or 0))
            self.tracker.log_metrics({RESTARTS: len(self.outcome.restarts)}, step=int(resumed or 0), once_per_step=False)
        for step in steps:
            if self.outcome.history and int(step["step"]) <= self.outcome.history[-1]["step"]:
                continue
            self.outcome.history.append(step)
            self.outcome.metrics |= step
            self._log(step)
        if self.on_report:
            self.on_report(steps)


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as err:  # handed to the driver's thread, which raises it
        return err


def _worker_entry(payload: dict[str, Any]) -> None:
    import logging

    from trainers.run import ray_train_loop

    # Ray Train 2.60 logs every report at INFO through a logger named by its file path, outside the
    # `ray.train` tree that LoggingConfig filters, so only the worker's root level keeps it off the console.
    logging.getLogger().setLevel(logging.WARNING)

    ray_train_loop(payload)


def _relay_callback(reports):
    """A Ray Train callback (it runs on the controller) forwarding rank 0's reports to the driver."""
    from ray.train import UserCallback

    class RelayReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            reports.put(dict(metrics[0]))

        def after_exception(self, run_context, worker_exceptions):
            failed = ", ".join(f"rank {rank}: {type(err).__name__}" for rank, err in sorted(worker_exceptions.items()))
            reports.put({WORKER_FAILURE: failed})

    return RelayReports()


class ProgressLine:
    """Terminal progress: 'step 40/300 | loss 2.91 | val 2.95 | 5.2k tok/s | ETA 1m02s'.

    On a terminal it redraws one line; elsewhere (CI logs, Ray job logs) it prints a line every 5% of steps.
    """

    def __init__(self, total_steps: int, interactive: bool):
        self.total, self.interactive = total_steps, interactive
        self.started: float | None = None
        self.first_step = 0
        self.val: float | None = None
        self.printed_at = -1

    def __call__(self, steps: list[dict[str, Any]]) -> None:
        """One report: the metrics of each step since the previous report, oldest first."""
        now = time.monotonic()
        last = int(steps[-1]["step"])
        if self.started is None:  # speed counts from the first report (a resumed run: from where it resumed)
            self.started, self.first_step = now, last
        rate = (now - self.started) / (last - self.first_step) if last > self.first_step else None
        for report in steps:
            if "val_loss" in report:
                self.val = report["val_loss"]
            if "loss" in report:
                self._show(report, None if rate is None else rate * (self.total - last))

    def _show(self, report: dict[str, Any], eta: float | None) -> None:
        step = int(report["step"])
        parts = [f"step {step}/{self.total}", f"loss {report['loss']:.3f}"]
        if self.val is not None:
            parts.append(f"val {self.val:.3f}")
        parts.append(f"{report.get('tokens_per_s', 0) / 1000:.1f}k tok/s")
        if eta is not None:
            parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        line = " | ".join(parts)
        if self.interactive:
            print("\r" + line.ljust(100), end="\n" if step == self.total else "", flush=True)
        elif step == self.total or step - self.printed_at >= max(1, self.total // 20):
            print(line, flush=True)
            self.printed_at = step
