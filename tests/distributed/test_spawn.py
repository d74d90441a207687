"""The test harness's process spawner tells a rank's Python error from a native crash, and reruns only the
latter, once, in a fresh directory."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.distributed.spawn import RankCrashed, once_more_after_a_crash, spawn


def _crash_unless_marked(marker: str, out: str) -> None:
    """Rank 0 dies by SIGSEGV while `marker` is missing; otherwise every rank writes its rank to out."""
    if dist.get_rank() == 0 and not Path(marker).exists():
        os.kill(os.getpid(), signal.SIGSEGV)
    Path(f"{out}.{dist.get_rank()}").write_text(str(dist.get_world_size()))


def _raise() -> None:
    raise ValueError("a bug in Python")


def test_a_native_crash_is_reported_with_the_ranks_stack(tmp_path):
    with pytest.raises(RankCrashed) as crash:
        spawn(_crash_unless_marked, 2, str(tmp_path / "never"), str(tmp_path / "out"), tmp=tmp_path)
    assert "SIGSEGV" in str(crash.value) and "_crash_unless_marked" in str(crash.value)  # faulthandler's dump


def test_a_python_error_is_not_taken_for_a_crash_and_not_rerun(tmp_path):
    attempts = []

    def attempt(root: Path) -> None:
        attempts.append(root)
        spawn(_raise, 2, tmp=root)

    with pytest.raises(AssertionError, match="ValueError: a bug in Python") as err:
        once_more_after_a_crash(attempt, tmp_path)
    assert not isinstance(err.value, RankCrashed) and attempts == [tmp_path]


def test_a_crash_is_rerun_once_in_a_fresh_directory(tmp_path):
    marker = tmp_path / "crashed-once"

    def attempt(root: Path) -> list[str]:
        try:
            spawn(_crash_unless_marked, 2, str(marker), str(root / "out"), tmp=root)
        finally:
            marker.touch()  # the second attempt runs clean
        return sorted(p.name for p in root.glob("out.*"))

    with pytest.warns(UserWarning, match="a rank crashed in native code"):
        assert once_more_after_a_crash(attempt, tmp_path) == ["out.0", "out.1"]
    # the rerun wrote to a fresh directory; the crashed attempt's lies as rank 0 left it
    assert sorted(p.name for p in (tmp_path / "after-crash").glob("out.*")) == ["out.0", "out.1"]
    assert not (tmp_path / "out.0").exists()


def test_a_second_crash_fails(tmp_path):
    def attempt(root: Path) -> None:
        spawn(_crash_unless_marked, 2, str(tmp_path / "never"), str(root / "out"), tmp=root)

    with pytest.warns(UserWarning), pytest.raises(RankCrashed):
        once_more_after_a_crash(attempt, tmp_path)
