"""orchestrator.console: what the driver keeps off the console of `flotilla train` and `sweep` (RAY_CHATTER:
Ray searches each forwarded line with it and drops the matches) and what it must let through; the lines a
worker failure and a restart print, from synthetic failures, as Ray Train's controller would find them
(orchestrator.relay.failure_callback) and as the driver's relay prints and logs them."""

import re
from pathlib import Path

import pytest

from orchestrator.console import RAY_CHATTER, FailedRank, failure_details, failure_line, restart_line, user_errors

CHATTER = re.compile(RAY_CHATTER)


@pytest.mark.parametrize("line", [
    "[2026-12-04 20:04:50,952 E 8145 8197] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'be12e7749efadb01dfc8213f01000000' has constructor arguments in the object store and max_restarts > 0.",
    "[2026-12-04 20:04:50,952 W 8145 8197] raylet_client.cc:130: a warning of Ray's C++ side",
    "WARNING: 8 PYTHON worker processes have been started on node: e7f2fd03 with address: 192.0.2.2, which is 4x "
    "the maximum expected startup concurrency (2).",
    "2026-12-04 20:07:40,877\tWARNING tensorboardx.py:115 -- You are trying to log an invalid value",
    "2026-12-04 20:07:40,877\tINFO worker.py:1998 -- Started a local Ray instance.",
    "A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the problem, "
    "check the logs for the dead worker. Worker PID: 24695 Worker exit type: SYSTEM_ERROR",
])
def test_ray_chatter_is_kept_off_the_console(line):
    assert CHATTER.search(line)


@pytest.mark.parametrize("line", [
    "Traceback (most recent call last):",
    '  File "/work/main/trainers/run.py", line 52, in build',
    "ValueError: /tmp/ds/train.arrow: not an Arrow IPC split file (Not an Arrow file); rebuild the dataset",
    "Error in training function:",
    "2026-12-04 20:07:40,877\tERROR worker.py:421 -- Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1')",
    "[2026-12-04 20:04:50,952 F 8145 8197] core_worker.cc:100: Check failed: a fatal error of Ray's C++ side",
    "flotilla: worker failure: rank 1 (pid 24695 on 192.0.2.2) died (ActorDiedError): its process was killed",
    "step 40/300 | loss 2.910 | val 2.950 | 5.2k tok/s | ETA 1m02s",
    "checkpoint: skipping checkpoint /runs/a/checkpoint_3: incomplete",
])
def test_errors_and_flotillas_lines_still_show(line):
    assert not CHATTER.search(line)


KILLED = FailedRank(1, "died", "ActorDiedError", "The actor died unexpectedly before finishing this task.",
                    "A worker health check failed.\nThe actor died unexpectedly ... killed by the OOM killer",
                    where="pid 24695 on 192.0.2.2")
COLLATERAL = FailedRank(0, "raised", "RuntimeError", "[pair.cc:537] Read error: Connection reset by peer",
                        'Traceback (most recent call last):\n  File "trainers/loop.py", line 168\nRuntimeError: ...',
                        where="pid 24694 on 192.0.2.2")
LOG = Path("/runs/a/flotilla.log")


def raised(rank: int, error: str = "ValueError", message: str = "bad batch") -> FailedRank:
    return FailedRank(rank, "raised", error, message, f"Traceback (most recent call last):\n{error}: {message}",
                      where=f"pid {100 + rank} on 10.0.0.{rank}")


def test_a_killed_worker_is_one_line_naming_its_rank_and_the_others_as_consequences():
    line = failure_line([COLLATERAL, KILLED], failure=1, max_failures=2, log=LOG)
    assert line == ("flotilla: worker failure: rank 1 (pid 24695 on 192.0.2.2) died (ActorDiedError): its process "
                    "was killed (e.g. SIGKILL, the OOM killer) or crashed; then rank 0 (pid 24694 on 192.0.2.2) "
                    "failed with RuntimeError; Ray Train restarts the workers from the latest checkpoint, restart 1 "
                    "of 2 (cluster.max_failures); full tracebacks in /runs/a/flotilla.log")
    assert user_errors([COLLATERAL, KILLED]) == []  # the survivor's traceback only in the log


def test_the_training_codes_own_error_is_named_with_its_message_and_its_traceback_shown():
    failed = [raised(0), raised(1), raised(2), raised(3), raised(5, "KeyError", "'loss'")]
    line = failure_line(failed, failure=1, max_failures=0, log=LOG)
    assert line == ("flotilla: worker failure: ranks 0-3 raised ValueError: bad batch; rank 5 (pid 105 on 10.0.0.5) "
                    "raised KeyError: 'loss'; no restart left (cluster.max_failures = 0): the run fails; "
                    "full tracebacks in /runs/a/flotilla.log")
    assert [f.rank for f in user_errors(failed)] == [0, 5]  # one traceback for each distinct error


@pytest.mark.parametrize("failure, max_failures, then", [
    (3, -1, "Ray Train restarts the workers from the latest checkpoint, restart 3 (cluster.max_failures = -1: "
            "no limit)"),
    (2, 1, "no restart left (cluster.max_failures = 1): the run fails"),
    (None, 0, "Ray Train restarts the workers from the latest checkpoint, a restart after a preemption (not counted "
              "against cluster.max_failures)"),
])
def test_the_failure_line_says_whether_ray_train_restarts(failure, max_failures, then):
    assert failure_line([KILLED], failure, max_failures, log=None).endswith(f"crashed; {then}")


def test_a_health_check_timeout_is_named_with_its_message():
    hung = FailedRank(2, "failed", "WorkerHealthCheckTimeoutError", "A worker health check has been hanging for 600.00 "
                      "seconds. Marking the worker as dead.", "...")
    assert failure_line([hung], 1, 1, None).startswith(
        "flotilla: worker failure: rank 2 failed with WorkerHealthCheckTimeoutError: A worker health check has been")
    assert user_errors([hung]) == []


@pytest.mark.parametrize("failure, max_failures, step, checkpoint, line", [
    (1, 1, 6, "/runs/a/checkpoint_2026-12-08_00-19-22.123456",
     "flotilla: restart 1 of 1 (cluster.max_failures): the workers continue from step 6 "
     "(checkpoint /runs/a/checkpoint_2026-12-08_00-19-22.123456)"),
    (4, -1, 10, None, "flotilla: restart 4 (cluster.max_failures = -1: no limit): the workers continue from step 10"),
    (1, 3, None, None,
     "flotilla: restart 1 of 3 (cluster.max_failures): the workers start over from step 0 (no checkpoint yet)"),
])
def test_the_restart_line_says_where_the_workers_continue(failure, max_failures, step, checkpoint, line):
    assert restart_line(failure, max_failures, step, checkpoint) == line


def test_failure_details_hold_every_ranks_traceback_in_rank_order():
    text = failure_details([KILLED, COLLATERAL])
    assert text.index("--- rank 0 (pid 24694 on 192.0.2.2): RuntimeError\nTraceback") < text.index(
        "--- rank 1 (pid 24695 on 192.0.2.2): ActorDiedError\nA worker health check failed.")


class _Tracker:
    def log_metrics(self, metrics, step, once_per_step=True):
        pass


@pytest.mark.parametrize("verbose", [False, True])
def test_the_relay_prints_a_failure_and_its_restart_and_logs_the_tracebacks(tmp_path, capsys, verbose):
    from orchestrator.relay import CHECKPOINT_PATH, WORKER_FAILURE, ReportRelay, RunOutcome
    from trainers.reporter import HISTORY, RESUMED_FROM

    log = tmp_path / "runs" / "a" / "flotilla.log"
    relay = ReportRelay(_Tracker(), RunOutcome("a", None, {}), None, max_failures=1, log=log, verbose=verbose)
    relay({"step": 4, HISTORY: [{"step": 4, "loss": 1.0}], CHECKPOINT_PATH: "/runs/a/checkpoint_4"})
    relay({WORKER_FAILURE: [COLLATERAL, KILLED]})
    relay({"step": 5, HISTORY: [{"step": 5, "loss": 1.0, RESUMED_FROM: 4}]})
    out, err = capsys.readouterr()
    assert out.splitlines() == [failure_line([COLLATERAL, KILLED], 1, 1, log),
                                "flotilla: restart 1 of 1 (cluster.max_failures): the workers continue from step 4 "
                                "(checkpoint /runs/a/checkpoint_4)"]
    assert err == (failure_details([COLLATERAL, KILLED]) if verbose else "")
    written = log.read_text()
    assert failure_details([COLLATERAL, KILLED]) in written and "continue from step 4" in written


def test_the_relay_always_prints_the_training_codes_traceback(tmp_path, capsys):
    from orchestrator.relay import WORKER_FAILURE, ReportRelay, RunOutcome

    relay = ReportRelay(_Tracker(), RunOutcome("a", None, {}), None, max_failures=0, log=tmp_path / "flotilla.log")
    relay({WORKER_FAILURE: [raised(0), raised(1)]})
    assert capsys.readouterr().err == failure_details([raised(0)])


def test_failure_callback_describes_what_ray_trains_poll_found():
    """orchestrator.relay.failure_callback fed a worker group and a poll status as Ray Train 2.60's controller
    builds them: a rank whose training code raised, one whose process died, one whose poll timed out."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import (UserExceptionWithTraceback, WorkerHealthCheckFailedError,
                                                   WorkerHealthCheckTimeoutError)
    from ray.train.v2._internal.execution.worker_group import WorkerGroupPollStatus, WorkerStatus

    from orchestrator.relay import WORKER_FAILURE, failure_callback

    relayed = []
    callback = failure_callback(SimpleNamespace(put=relayed.append))
    workers = [SimpleNamespace(distributed_context=SimpleNamespace(world_rank=rank),
                               metadata=SimpleNamespace(pid=100 + rank, node_ip="10.0.0.9")) for rank in range(4)]
    callback.after_worker_group_start(SimpleNamespace(get_workers=lambda: workers))
    callback.after_worker_group_poll_status(WorkerGroupPollStatus(worker_statuses={0: WorkerStatus(running=True)}))
    assert relayed == []  # nothing failed

    traceback_text = "Traceback (most recent call last):\n  File \"trainers/loop.py\", line 9\nValueError: bad batch\n"
    callback.after_worker_group_poll_status(WorkerGroupPollStatus(worker_statuses={
        0: WorkerStatus(running=False, error=UserExceptionWithTraceback(ValueError("bad batch"), traceback_text)),
        1: WorkerStatus(running=False,
                        error=WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())),
        2: WorkerStatus(running=True, error=WorkerHealthCheckTimeoutError("A worker health check has been hanging")),
        3: WorkerStatus(running=True),
    }))
    (message,) = relayed
    raised_rank, died, hung = message[WORKER_FAILURE]
    assert raised_rank == FailedRank(0, "raised", "ValueError", "bad batch", traceback_text, "pid 100 on 10.0.0.9")
    assert (died.rank, died.how, died.error, died.where, died.preempted) == (
        1, "died", "ActorDiedError", "pid 101 on 10.0.0.9", False)
    assert died.detail.startswith("A worker health check failed.\nThe actor died unexpectedly")
    assert (hung.how, hung.error, hung.message) == (
        "failed", "WorkerHealthCheckTimeoutError", "A worker health check has been hanging")
