"""A worker killed mid-run, as the console of `flotilla train` shows it without --verbose: one line naming the
killed rank and its pid, one line for the restart with the step it continued from, and none of Ray's
tracebacks, which the run's log file holds instead (orchestrator.console, orchestrator.relay). The real CLI on
an embedded Ray."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
import yaml

from orchestrator.relay import RUN_LOG

from tests.integration.test_faults import finish, flotilla, read_until

STEPS, EVERY = 8, 2
# Two workers, so that one outlives the other's death and fails after it (a collective finds its peer gone);
# a report and a checkpoint every 2 steps (each report costs ~2 s on 2 cores), so the kill lands past one.
CONFIG = {
    "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "synthetic", "synthetic_docs": 100, "synthetic_mean_len": 20},
    "train": {"steps": STEPS, "micro_batch_size": 2, "seq_len": 16, "val_every": STEPS, "val_batches": 1,
              "log_every": EVERY},
    "cluster": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
    "checkpoint": {"every": EVERY, "keep": 2, "dir": "runs"},
    "tracking": {"experiment": "failure-console", "system_metrics": False, "run_name": "killed", "log_models": "none"},
}
# Ray's own reports of the death and its tracebacks, which only the log file and --verbose show.
RAY_NOISE = ("Traceback", "Error in training function", "OOM killer", "(TrainController", "(raylet)",
             "Graceful shutdown", "RayTrainWorker pid=")


def train_workers(driver: psutil.Process, timeout: float = 30) -> list[psutil.Process]:
    """The Ray Train worker processes under the driver's embedded Ray (titled ray::RayTrainWorker)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = [p for p in driver.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
        if len(workers) == 2 or time.monotonic() > deadline:
            return workers
        time.sleep(0.2)


def clean_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_", "RAY_DEDUP_LOGS", "RAY_AIR_NEW_OUTPUT"))}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}


def test_a_killed_worker_is_one_line_and_its_restart_another(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    proc = flotilla(["train", "run.yaml"], clean_env(tmp_path), tmp_path)
    seen = read_until(proc, f"step {EVERY}/{STEPS}")  # the step-2 checkpoint is registered
    workers = train_workers(psutil.Process(proc.pid))
    assert len(workers) == 2, [p.cmdline() for p in workers]
    killed = workers[-1].pid
    os.kill(killed, signal.SIGKILL)
    out = finish(proc, seen)
    assert "flotilla: finished killed" in out

    log = tmp_path / "runs" / "killed" / RUN_LOG
    (failure,) = [line for line in out.splitlines() if line.startswith("flotilla: worker failure:")]
    assert re.search(rf"rank [01] \(pid {killed} on [\d.]+\) died \(ActorDiedError\): its process was killed "
                     r"\(e\.g\. SIGKILL", failure), failure
    assert failure.endswith(f"restart 1 of 1 (cluster.max_failures); full tracebacks in {log}"), failure
    (restart,) = re.findall(r"^flotilla: restart 1 of 1 \(cluster\.max_failures\): the workers continue from "
                            r"step (\d+)", out, re.MULTILINE)
    assert int(restart) >= EVERY and int(restart) % EVERY == 0  # from a checkpoint, not from scratch
    # Not the lines of Ray Train's PlacementGroupCleaner, which crashes with a traceback of its own on a machine
    # running another Ray instance ("Found multiple active Ray instances": it looks up the cluster's address).
    others = "\n".join(line for line in out.replace(failure, "").splitlines()
                       if "(PlacementGroupCleaner pid=" not in line)
    assert not [noise for noise in (*RAY_NOISE, "ActorDiedError") if noise in others], out

    written = log.read_text()
    assert failure in written and f"pid: {killed}" in written  # Ray's whole report of the death
    if "then rank" in failure:  # the survivor raised before the worker group was shut down: its traceback
        assert "Traceback (most recent call last)" in written


@pytest.mark.slow  # ~38 s; the killed-worker test above keeps the console's failure lines in the default suite
def test_a_failure_past_max_failures_ends_the_run_in_two_lines(tmp_path):
    """cluster.max_failures = 0: the failure's line says no restart is left, and the run's end is one more line
    (exit 1) naming the log and how to continue, instead of the driver's traceback of Ray's WorkerGroupError."""
    config = {**CONFIG, "cluster": {**CONFIG["cluster"], "max_failures": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = flotilla(["train", "run.yaml"], clean_env(tmp_path), tmp_path)
    seen = read_until(proc, f"step {EVERY}/{STEPS}")
    workers = train_workers(psutil.Process(proc.pid))
    assert len(workers) == 2, [p.cmdline() for p in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    out = seen + out
    assert proc.returncode == 1, out[-4000:]
    log = tmp_path / "runs" / "killed" / RUN_LOG
    (failure,) = [line for line in out.splitlines() if line.startswith("flotilla: worker failure:")]
    assert "no restart left" in failure, failure
    (end,) = [line for line in out.splitlines() if line.startswith("flotilla: run killed failed:")]
    assert f"Ray's report in {log}" in end and "-o tracking.run_name=killed" in end
    others = "\n".join(line for line in out.replace(failure, "").replace(end, "").splitlines()
                       if "(PlacementGroupCleaner pid=" not in line)
    assert not [noise for noise in (*RAY_NOISE, "ActorDiedError", "WorkerGroupError") if noise in others], out
    assert "WorkerGroupError" in log.read_text()  # Ray's whole report of the end
