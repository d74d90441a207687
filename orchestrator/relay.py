"""Rank 0's reports on their way to the driver: a Ray Train callback on the controller puts each into a Ray
queue (`relay_callback`), and the driver's ReportRelay takes them into the run's outcome and MLflow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


def relay_callback(reports):
    """A Ray Train callback (it runs on the controller) forwarding rank 0's reports to the driver."""
    from ray.train import UserCallback

    class RelayReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            reports.put(dict(metrics[0]))

        def after_exception(self, run_context, worker_exceptions):
            failed = ", ".join(f"rank {rank}: {type(err).__name__}" for rank, err in sorted(worker_exceptions.items()))
            reports.put({WORKER_FAILURE: failed})

    return RelayReports()
