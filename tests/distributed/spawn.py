"""Run a function on N CPU processes joined by a gloo process group on a free loopback port."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, error_dir: str) -> None:
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


def spawn(fn, world: int, *args, tmp: Path) -> None:
    """Run fn(*args) on `world` ranks; re-raise the first rank's traceback if any rank fails."""
    error_dir = Path(tmp) / "errors"
    error_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, str(error_dir)), nprocs=world, start_method="spawn")
    except Exception as err:
        reports = sorted(error_dir.glob("rank*.txt"))
        raise AssertionError(reports[0].read_text() if reports else str(err)) from None
