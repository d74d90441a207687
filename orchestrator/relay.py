"""Rank 0's reports on their way to the driver: a Ray Train callback on the controller puts each into a Ray
queue (`relay_callback`), and the driver's ReportRelay takes them into the run's outcome and MLflow. Another
(`failure_callback`) puts there what each failed rank did when the worker group fails, which the relay prints
as one line (orchestrator.console) and writes in full to the run's log file (RUN_LOG)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.console import FailedRank, failure_details, failure_line, restart_line, user_errors
from orchestrator.tracking import Tracker
from trainers.reporter import CHECKPOINT_STEPS, HISTORY, RESUMED_FROM, SKIPPED_CHECKPOINTS


@dataclass
class RunOutcome:
    """What a run left (run_training returns it): the relay fills in its steps as reports arrive."""

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


WORKER_FAILURE = "flotilla.worker_failure"
"""Key of a relayed message saying what each failed rank did (a list of FailedRank), instead of a report."""

RUN_LOG = "flotilla.log"
"""The run's log file, in its storage (checkpoint.dir/RUN_NAME): each worker failure's full tracebacks."""

CHECKPOINT_PATH = "flotilla.checkpoint_path"
"""Key of a relayed report with a persisted checkpoint: where Ray Train put it (taken out before metrics are logged)."""

RESTARTS = "restarts"
"""MLflow metric: the number of worker-group restarts so far, logged at the step the restart continued from."""


class ReportRelay:
    """The driver's side of the report queue: each step to the outcome and MLflow once, and restarts recorded.

    When a worker dies, Ray Train (FailureConfig.max_failures) starts a new worker group that continues from
    the run's latest checkpoint and does again the steps after it. Those steps were already logged: they are
    not logged twice (an exact resume computes the same values). The restart itself is logged as the metric
    `restarts` at the step it continued from (the worker's first report says which: RESUMED_FROM).

    Each failure is one console line and each restart another; the failed ranks' full tracebacks go to `log`,
    and to the console with `verbose` or where the training code raised (orchestrator.console)."""

    def __init__(self, tracker: Tracker, outcome: RunOutcome, on_report: Callable | None, max_failures: int,
                 on_checkpoint: Callable[[str, int], None] | None = None, log: Path | None = None,
                 verbose: bool = False):
        self.tracker, self.outcome, self.on_report, self.max_failures = tracker, outcome, on_report, max_failures
        self.on_checkpoint = on_checkpoint
        """Sees each persisted checkpoint (its path and step) once its steps are logged (orchestrator.model_logging)."""
        self.log, self.verbose = log, verbose
        self.failed = False
        """A failure awaits its restart line: the restarted worker group's first report says where it continued."""
        self.failures = 0
        """The failures so far that count against max_failures (a preemption does not)."""
        self.restart: int | None = None
        """The restart awaited: its number against max_failures (None: after a preemption)."""
        self.checkpoints: dict[int, str] = {}
        """Each persisted checkpoint's path by its step, for the restart line."""

    def _log(self, step: dict[str, Any]) -> None:
        self.tracker.log_metrics({k: v for k, v in step.items() if k != "step"}, step=int(step["step"]))

    def __call__(self, report: dict[str, Any]) -> None:
        if WORKER_FAILURE in report:
            self._failure(report[WORKER_FAILURE])
            return
        checkpoint = report.pop(CHECKPOINT_PATH, None)
        steps = report.get(HISTORY, [report])
        if checkpoint is not None:
            self.checkpoints[int(steps[-1]["step"])] = checkpoint
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
            line = restart_line(self.restart, self.max_failures, resumed,
                                None if resumed is None else self.checkpoints.get(int(resumed)))
            print(line, flush=True)
            self._write_log(line + "\n")
        for step in steps:
            if self.outcome.history and int(step["step"]) <= self.outcome.history[-1]["step"]:
                continue
            self.outcome.history.append(step)
            self.outcome.metrics |= step
            self._log(step)
        if self.on_report:
            self.on_report(steps)
        if checkpoint is not None and self.on_checkpoint:
            self.on_checkpoint(checkpoint, int(steps[-1]["step"]))

    def _failure(self, failed: list[FailedRank]) -> None:
        preempted = any(f.preempted for f in failed)  # Ray Train charges preemptions to a budget of their own
        self.failures += not preempted
        self.failed, self.restart = True, None if preempted else self.failures
        line = failure_line(failed, self.restart, self.max_failures, self.log)
        self._write_log(f"{line}\n{failure_details(failed)}")
        print(line, flush=True)
        shown = failed if self.verbose else user_errors(failed)
        if shown:
            print(failure_details(shown), end="", file=sys.stderr, flush=True)

    def _write_log(self, text: str) -> None:
        if self.log is None:
            return
        try:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")
        except OSError as err:  # the run goes on; the console line still says what failed
            print(f"warning: could not write the run's log {self.log}: {err}", flush=True)


def relay_callback(reports):
    """A Ray Train callback (it runs on the controller) forwarding rank 0's reports to the driver."""
    from ray.train import UserCallback

    class RelayReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            reports.put({**metrics[0], **({CHECKPOINT_PATH: checkpoint.path} if checkpoint is not None else {})})

    return RelayReports()


def failure_callback(reports):
    """A Ray Train callback (it runs on the controller) telling the driver, at each failure of the worker group,
    what each failed rank did: {WORKER_FAILURE: [FailedRank, ...]}.

    Ray Train's public UserCallback.after_exception gets each rank's exception without its traceback, and not
    where the worker ran; an internal WorkerGroupCallback (RunConfig.callbacks takes those too, Ray 2.60) sees
    the poll that found the failure, with the training code's traceback, and the workers as they started."""
    import traceback

    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    def first_line(error: BaseException) -> str:
        return next(iter(str(error).strip().splitlines()), "")

    def failed_rank(rank: int, found: Exception, error: Exception, where: str | None) -> FailedRank:
        """`found`: what the poll of `rank` found; `error`: the exception it wraps, if it wraps one."""
        if isinstance(found, UserExceptionWithTraceback):  # the training code raised; str() is its traceback
            return FailedRank(rank, "raised", type(error).__name__, first_line(error), str(found), where)
        # A poll that could not reach the worker wraps why: RayActorError where its process is gone.
        wrapped = isinstance(found, WorkerHealthCheckFailedError)
        cause = found.health_check_failure if wrapped else found
        died = isinstance(cause, RayActorError)
        return FailedRank(rank, "died" if died else "failed", type(cause).__name__, first_line(cause),
                          str(found) if wrapped else "".join(traceback.format_exception(found)), where,
                          died and cause.preempted)

    class RelayFailures(WorkerGroupCallback):
        def __init__(self):
            self.where: dict[int, str] = {}

        def after_worker_group_start(self, worker_group):
            self.where = {w.distributed_context.world_rank: f"pid {w.metadata.pid} on {w.metadata.node_ip}"
                          for w in worker_group.get_workers()}

        def after_worker_group_poll_status(self, worker_group_status):
            errors = worker_group_status.errors  # rank -> the exception, unwrapped
            if errors:
                found = worker_group_status.worker_statuses
                reports.put({WORKER_FAILURE: [failed_rank(rank, found[rank].error, error, self.where.get(rank))
                                              for rank, error in sorted(errors.items())]})

    return RelayFailures()
