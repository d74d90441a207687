"""Where a trainer's metrics and checkpoints go: the only module of `trainers` that imports Ray.

The loop talks to a `Reporter`; `RayReporter` hands reports to Ray Train (or Ray Tune, which receives
Ray Train's reports through its callback), `LocalReporter` keeps them in memory and on disk, so the same
loop runs under Ray, under torchrun, or in a plain test process.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist


HISTORY = "history"
"""Key of a Ray report holding every step's metrics since the previous report."""


class Reporter(Protocol):
    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A context giving the directory of the checkpoint to resume from, or None."""

    def report(self, steps: list[dict[str, Any]], checkpoint_dir: Path | None = None) -> None:
        """Collective: every rank reports at the same steps. `steps` holds each step's metrics since the
        last report (reports are batched: each one costs a round trip through Ray Train's controller);
        `checkpoint_dir` is this rank's part of a checkpoint taken at the last of them."""


class RayReporter:
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return contextlib.nullcontext(None)
        return _as_path(checkpoint)

    def report(self, steps, checkpoint_dir=None):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Ray sees the last step's metrics (what Tune schedules on); the driver unpacks the history.
        ray.train.report({**steps[-1], HISTORY: steps}, checkpoint=checkpoint)


@contextlib.contextmanager
def _as_path(checkpoint) -> Iterator[Path]:
    with checkpoint.as_directory() as d:
        yield Path(d)


class LocalReporter:
    """Keeps rank 0's metrics in `self.metrics`; persists checkpoints under `root/checkpoint_<step>`.

    Like Ray Train, every rank saves into its own staging directory and the parts are merged into one
    checkpoint, renamed into place only when complete.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.metrics: list[dict[str, Any]] = []

    def _rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def latest_checkpoint(self):
        done = sorted(self.root.glob("checkpoint_*[0-9]"), key=lambda p: int(p.name.split("_")[-1]))
        return contextlib.nullcontext(done[-1] if done else None)

    def report(self, steps, checkpoint_dir=None):
        if self._rank() == 0:
            self.metrics.extend(dict(m) for m in steps)
        if checkpoint_dir is None:
            return
        step = steps[-1]["step"]
        staging = self.root / f".staging_{step}"
        self._barrier()
        if self._rank() == 0:
            staging.mkdir(parents=True, exist_ok=True)
        self._barrier()
        for f in Path(checkpoint_dir).iterdir():
            shutil.copy2(f, staging / f.name)
        self._barrier()
        if self._rank() == 0:
            staging.rename(self.root / f"checkpoint_{step}")
        self._barrier()


def staging_dir() -> tempfile.TemporaryDirectory:
    """A fresh local directory for one rank's part of a checkpoint, removed after it is reported."""
    return tempfile.TemporaryDirectory(prefix="flotilla-ckpt-")
