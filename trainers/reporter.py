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

from trainers.checkpoint import newest_complete, read_reported_steps

HISTORY = "history"
"""Key of a Ray report holding every step's metrics since the previous report."""

RESUMED_FROM = "resumed_from_step"
"""Added to the first step's metrics after a restore: the step of the checkpoint training continued from
(the driver records a restarted worker group with it)."""

CHECKPOINT_STEPS = "checkpoint_steps"
"""Added to the first step's metrics after a restore: the metrics of the steps reported with the checkpoint
training continued from (trainers.checkpoint.read_reported_steps), for a driver that died before it logged them."""

SKIPPED_CHECKPOINTS = "skipped_checkpoints"
"""Added to the first step's metrics after a restore that passed over incomplete checkpoints: the warnings
naming them, which the driver prints (a worker's own log lines do not reach a job's log)."""


class Reporter(Protocol):
    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A context giving the directory of the checkpoint to resume from, or None."""

    def has_checkpoint(self) -> bool:
        """Whether the run will resume from a checkpoint (cheap: nothing is fetched or verified)."""

    def report(self, steps: list[dict[str, Any]], checkpoint_dir: Path | None = None) -> None:
        """Collective: every rank reports at the same steps. `steps` holds each step's metrics since the
        last report (reports are batched: each one costs a round trip through Ray Train's controller);
        `checkpoint_dir` is this rank's part of a checkpoint taken at the last of them."""


class RayReporter:
    def __init__(self):
        self._resumed_from: int | None = None
        self._checkpoint_steps: list[dict[str, Any]] = []
        self._skipped: list[str] = []

    def has_checkpoint(self) -> bool:
        import ray.train

        return ray.train.get_checkpoint() is not None

    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return contextlib.nullcontext(None)
        return self._newest_complete(checkpoint)

    @contextlib.contextmanager
    def _newest_complete(self, latest) -> Iterator[Path]:
        """The newest complete checkpoint in the run's storage: Ray Train's latest, or one persisted after it
        whose report never registered (a job stopped between the two), or, where those are incomplete (a
        writer died, a copy was cut short), the newest complete one before them. Ray names checkpoint
        folders by their time (checkpoint_<date>_<time>.<us>), so sorting by name sorts by age."""
        import ray.train
        from pyarrow import fs

        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        found = sorted((info.path for info in latest.filesystem.get_file_info(fs.FileSelector(parent))
                        if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")),
                       reverse=True)
        with contextlib.ExitStack() as opened:  # each one fetched only if the newer ones were refused
            local = (Path(opened.enter_context(ray.train.Checkpoint(path, latest.filesystem).as_directory()))
                     for path in found or [latest.path])
            path, self._resumed_from, self._skipped = newest_complete(local)
            self._checkpoint_steps = read_reported_steps(path)
            yield path

    def report(self, steps, checkpoint_dir=None):
        import ray.train

        if self._resumed_from is not None:
            steps = [{**steps[0], RESUMED_FROM: self._resumed_from, CHECKPOINT_STEPS: self._checkpoint_steps,
                      SKIPPED_CHECKPOINTS: self._skipped}, *steps[1:]]
            self._resumed_from, self._checkpoint_steps, self._skipped = None, [], []
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Ray sees the last step's metrics (what Tune schedules on); the driver unpacks the history.
        ray.train.report({**steps[-1], HISTORY: steps}, checkpoint=checkpoint)


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

    def has_checkpoint(self) -> bool:
        return any(self.root.glob("checkpoint_*[0-9]"))

    def latest_checkpoint(self):
        done = sorted(self.root.glob("checkpoint_*[0-9]"), key=lambda p: int(p.name.split("_")[-1]), reverse=True)
        return contextlib.nullcontext(newest_complete(done)[0] if done else None)

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
