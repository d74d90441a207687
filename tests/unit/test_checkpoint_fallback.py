"""A checkpoint whose writer died mid-write is passed over, with warnings naming it, for the newest complete one;
none complete is an error, never a silent start from scratch."""

from __future__ import annotations

import pytest
import torch

from trainers.checkpoint import CheckpointError, TrainState, newest_complete, save_checkpoint
from trainers.reporter import LocalReporter


def checkpoint(path, step):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(path, model, optimizer, TrainState(step=step, tokens_seen=step * 10))
    return path


def truncate_biggest(path):
    biggest = max((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    older, newer = checkpoint(tmp_path / "checkpoint_5", 5), checkpoint(tmp_path / "checkpoint_10", 10)
    assert newest_complete([newer, older]) == (newer, 10, [])
    truncate_biggest(newer)
    path, step, warnings = newest_complete([newer, older])
    assert (path, step) == (older, 5)
    assert warnings[0].startswith(f"skipping checkpoint {newer}: ") and "incomplete checkpoint" in warnings[0]
    assert warnings[1] == f"resuming from the previous complete checkpoint {older} (step 5)"
    with LocalReporter(tmp_path).latest_checkpoint() as latest:  # newest by step first, as Ray Train's by time
        assert latest == older


def test_no_complete_checkpoint_is_an_error(tmp_path):
    only = checkpoint(tmp_path / "checkpoint_5", 5)
    truncate_biggest(only)
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from: skipping checkpoint"):
        newest_complete([only])
