"""What `flotilla train` and `flotilla sweep` print: Flotilla's own lines and real errors. The chatter of the
libraries under them only with --verbose: the C++ log lines of Ray's processes, the raylet's warnings
about worker start-ups, Ray's Python log lines below ERROR, Tune's banner and MLflow's INFO lines.

Errors still show: the filter on what Ray forwards from its processes skips only the patterns below, so a
failed worker's traceback reaches the console as before, and Ray Train hands the error to the driver,
which raises it.
"""

from __future__ import annotations

import os

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
