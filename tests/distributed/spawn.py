"""Run a function on N CPU processes joined by a gloo process group on a free loopback port."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, error_dir: str) -> None:
    # A crash in C++ (gloo, a kernel) leaves no Python traceback: have each rank dump every thread's stack to a
    # file the parent can show.
    fault_log = open(Path(error_dir, f"rank{rank}.fault"), "w")
    faulthandler.enable(file=fault_log, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
        # Leave together: a rank that tears down gloo while another still talks to it can abort in C++.
        dist.barrier()
    except BaseException:
        Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads, destroyed during finalisation, sometimes abort the process
    # ("terminate called without an active exception") after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RankCrashed(AssertionError):
    """A rank died by a signal in native code (gloo, the allocator): no Python traceback, no wrong result."""


def spawn(fn, world: int, *args, tmp: Path) -> None:
    """Run fn(*args) on `world` ranks; re-raise the first rank's traceback if any rank fails, or RankCrashed
    (with each rank's stack dump) if one died by a signal without one."""
    error_dir = Path(tmp) / "errors"
    error_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, str(error_dir)), nprocs=world, start_method="spawn")
    except Exception as err:
        reports = sorted(error_dir.glob("rank*.txt"))
        if isinstance(err, mp.ProcessExitedException) and err.signal_name is not None:
            # the other ranks' errors (a peer closed the connection) follow from the crash: show them after it
            dumps = [f"{f.stem}:\n{f.read_text()}" for f in sorted(error_dir.glob("rank*.fault")) if f.stat().st_size]
            raise RankCrashed("\n".join([str(err), *dumps, *(r.read_text() for r in reports)])) from None
        raise AssertionError(reports[0].read_text() if reports else str(err)) from None


T = TypeVar("T")


def once_more_after_a_crash(attempt: Callable[[Path], T], tmp: Path) -> T:
    """attempt(directory), and if a rank crashed in native code, once more in a fresh directory (so nothing
    resumes from the crashed attempt's checkpoints), with a warning that carries the crash's stack dumps.

    Why: on the 2-core CI machine a gloo rank has died by SIGSEGV once in hundreds of runs of tests that
    pass otherwise. A second crash, a Python error or a wrong result still fails the test."""
    try:
        return attempt(tmp)
    except RankCrashed as crash:
        warnings.warn(f"a rank crashed in native code; running the spawn once more:\n{crash}", stacklevel=2)
        fresh = Path(tmp) / "after-crash"
        fresh.mkdir()
        return attempt(fresh)
