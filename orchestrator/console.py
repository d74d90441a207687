"""What `flotilla train` and `flotilla sweep` print: Flotilla's own lines and real errors. The chatter of the
libraries under them only with --verbose: the C++ log lines of Ray's processes, the raylet's warnings
about worker start-ups, Ray's Python log lines below ERROR (Ray Train's: its LoggingConfig, in
orchestrator.launch), Tune's banner and MLflow's INFO lines.

Errors still show: the filter on what Ray forwards from its processes skips only the patterns below, and
Ray Train hands a run's final error to the driver, which raises it.

A failure of the worker group (a worker killed, crashed or raising) is one line (`failure_line`), and its
restart another (`restart_line`); orchestrator.relay prints them and writes every failed rank's full traceback
or death report (`failure_details`) to the run's log file (orchestrator.relay.RUN_LOG). The console shows those
too with --verbose, and always the training code's own exceptions (`user_errors`): the user needs them to fix
their code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

RAY_CHATTER = "|".join((
    # Ray's C++ log lines below FATAL, e.g. "[2026-12-04 20:04:50,952 E 8145 8197] core_worker.cc:2465: Actor
    # with class name: 'PreemptionWatcher' ...", which every Ray Train controller prints though nothing failed.
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] \w+\.cc:\d+:",
    # The raylet's "WARNING: 8 PYTHON worker processes have been started on node: ...": a sweep's trial
    # drivers are many light actors, by design (tune.sweep.DRIVER_RESOURCES).
    r"PYTHON worker processes have been started",
    # Ray's Python loggers below ERROR, in its format: "2026-12-04 20:07:40,877\tWARNING tensorboardx.py:115 -- ...".
    # Flotilla's own loggers never use this format.
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING) \S+\.py:\d+ -- ",
    # nanobind's report, as a worker that imported Triton exits, of Triton's bindings still alive at exit
    # ("nanobind: leaked 514 functions!", " - leaked function ...", a link): dozens of lines, nothing failed.
    r"^nanobind: |^ - leaked (instance|type|function) |^ - \.\.\. skipped remainder|^See https://nanobind\.",
    # The raylet's report of a worker process that died ("A worker died or was killed while executing a task by
    # an unexpected system error. ... Worker PID: 24695 ... the OOM killer ..."): failure_line names the rank.
    r"^A worker died or was killed while executing a task by an unexpected system error",
))
"""Lines Ray's processes print that the driver does not forward to the console (a regex, searched)."""

RAY_LOG_LEVEL = "ERROR"
"""The level of the driver's own `ray` loggers when quiet (ray.init's logging_level)."""


def quiet() -> None:
    """Keep the chatter off this process's console. Ray and MLflow read these settings when they are
    imported (or, Tune, when a sweep starts), so this runs before either is; a variable the user set wins."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_CHATTER)
    # Tune's older console reporter prints nothing at RunConfig(verbose=0); the newer one prints its banner
    # ("Configuration for experiment ...", where results and TensorBoard logs are) at every verbosity.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@dataclass
class FailedRank:
    """What one rank of a failed worker group did, as Ray Train's controller saw it (orchestrator.relay)."""

    rank: int
    how: Literal["died", "raised", "failed"]
    """"died" (its process ended without a Python exception: killed or crashed), "raised" (the training code's
    own exception) or "failed" (anything else Ray Train reported, e.g. a health check that timed out)."""
    error: str
    """The exception's type: the worker's own, or Ray's (ActorDiedError for a death)."""
    message: str
    """The exception's first line."""
    detail: str
    """Its full traceback, or Ray's whole report of the death."""
    where: str | None = None
    """"pid 24695 on 192.0.2.2": the worker's process and node, where the controller knew them."""
    preempted: bool = False
    """Died with its node, which was preempted: Ray Train restarts without counting it against max_failures."""


def _ranks(ranks: list[int]) -> str:
    """'rank 3', 'ranks 0-3, 6'."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {text}"


def _who(group: list[FailedRank]) -> str:
    where = group[0].where if len(group) == 1 else None
    return _ranks([f.rank for f in group]) + (f" ({where})" if where else "")


def _grouped(failed: list[FailedRank], with_message: bool) -> list[list[FailedRank]]:
    """Ranks that failed alike, in order of their lowest rank (64 ranks raising one error are one group)."""
    groups: dict[tuple, list[FailedRank]] = {}
    for f in sorted(failed, key=lambda f: f.rank):
        groups.setdefault((f.how, f.error, f.message if with_message else None), []).append(f)
    return list(groups.values())


def _restart_of(failure: int | None, max_failures: int) -> str:
    if failure is None:
        return "a restart after a preemption (not counted against cluster.max_failures)"
    if max_failures == -1:
        return f"restart {failure} (cluster.max_failures = -1: no limit)"
    return f"restart {failure} of {max_failures} (cluster.max_failures)"


def failure_line(failed: list[FailedRank], failure: int | None, max_failures: int, log: Path | None) -> str:
    """The console's one line for a failure of the worker group. `failure`: how many failures so far count
    against `max_failures` (None: this one does not, a preemption); `log`: where the full tracebacks are.

    When a worker dies, the others fail after it (a collective finds its peer gone), so their errors are
    named as consequences, without their message."""
    died = [f for f in failed if f.how == "died"]
    killed = "its process was killed (e.g. SIGKILL, the OOM killer) or crashed"
    parts = [f"{_who([f])} died ({f.error}): {'its node was preempted' if f.preempted else killed}"
             for f in sorted(died, key=lambda f: f.rank)]
    for group in _grouped([f for f in failed if f.how != "died"], with_message=not died):
        first = group[0]
        if died:
            parts.append(f"then {_who(group)} failed with {first.error}")
        else:
            verb = "raised" if first.how == "raised" else "failed with"
            parts.append(f"{_who(group)} {verb} {first.error}" + (f": {first.message}" if first.message else ""))
    if failure is not None and max_failures != -1 and failure > max_failures:
        then = f"no restart left (cluster.max_failures = {max_failures}): the run fails"
    else:
        then = f"Ray Train restarts the workers from the latest checkpoint, {_restart_of(failure, max_failures)}"
    return f"flotilla: worker failure: {'; '.join(parts)}; {then}" + (f"; full tracebacks in {log}" if log else "")


def restart_line(failure: int | None, max_failures: int, step: int | None, checkpoint: str | None) -> str:
    """The console's line once a restarted worker group reports: the step (and checkpoint) it continued from."""
    if step is None:
        return f"flotilla: {_restart_of(failure, max_failures)}: the workers start over from step 0 (no checkpoint yet)"
    return (f"flotilla: {_restart_of(failure, max_failures)}: the workers continue from step {step}"
            + (f" (checkpoint {checkpoint})" if checkpoint else ""))


def user_errors(failed: list[FailedRank]) -> list[FailedRank]:
    """The failed ranks whose traceback the console always shows: the training code's own exceptions, one rank
    for each distinct error; none where a worker died (the others' errors then are the death's consequences)."""
    if any(f.how == "died" for f in failed):
        return []
    return [group[0] for group in _grouped([f for f in failed if f.how == "raised"], with_message=True)]


def failure_details(failed: list[FailedRank]) -> str:
    """Each failed rank's full traceback or death report, headed by who it was."""
    return "".join(f"--- {_who([f])}: {f.error}\n{f.detail.rstrip()}\n" for f in sorted(failed, key=lambda f: f.rank))
