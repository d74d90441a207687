"""orchestrator.console.RAY_CHATTER: what the driver keeps off the console of `flotilla train` and `sweep`
(Ray searches each forwarded line with it and drops the matches), and what it must let through."""

import re

import pytest

from orchestrator.console import RAY_CHATTER

CHATTER = re.compile(RAY_CHATTER)


@pytest.mark.parametrize("line", [
    "[2026-12-04 20:04:50,952 E 8145 8197] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'be12e7749efadb01dfc8213f01000000' has constructor arguments in the object store and max_restarts > 0.",
    "[2026-12-04 20:04:50,952 W 8145 8197] raylet_client.cc:130: a warning of Ray's C++ side",
    "WARNING: 8 PYTHON worker processes have been started on node: e7f2fd03 with address: 192.0.2.2, which is 4x "
    "the maximum expected startup concurrency (2).",
    "2026-12-04 20:07:40,877\tWARNING tensorboardx.py:115 -- You are trying to log an invalid value",
    "2026-12-04 20:07:40,877\tINFO worker.py:1998 -- Started a local Ray instance.",
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
    "worker failure (rank 1: ActorDiedError); Ray Train restarts the workers from the last checkpoint",
    "step 40/300 | loss 2.910 | val 2.950 | 5.2k tok/s | ETA 1m02s",
    "checkpoint: skipping checkpoint /runs/a/checkpoint_3: incomplete",
])
def test_errors_and_flotillas_lines_still_show(line):
    assert not CHATTER.search(line)
