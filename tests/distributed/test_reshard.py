"""A checkpoint written under one layout loads under another and continues with the same loss (DCP reshards)."""

from __future__ import annotations

import pytest

from tests.distributed.spawn import spawn
from tests.distributed.test_data_parallel import _train_then_crash, losses, small_config, train_curve


@pytest.mark.parametrize("before, after", [
    ({"tp": 2, "dp_shard": 1}, {"tp": 1, "dp_shard": -1}),
    # the other directions, ~35 s each on 2 cores: -m slow (the default suite stays within CI's ~20 minutes)
    pytest.param({"tp": 1, "dp_shard": -1}, {"tp": 2, "dp_shard": 1}, marks=pytest.mark.slow),
    pytest.param({"tp": 1, "sp": 2, "dp_shard": 1}, {"tp": 1, "dp_shard": -1}, marks=pytest.mark.slow),  # dp_shard x sp -> dp_shard
])
def test_checkpoint_continues_under_another_layout(tmp_path, before, after):
    # Same global batch of 8 rows in both layouts: tp=2 and sp=2 have one data-parallel rank, dp_shard=2 two.
    def config(parallel):
        micro = 8 if parallel["tp"] == 2 or parallel.get("sp", 1) == 2 else 4
        return small_config(micro, 1, parallel=parallel, checkpoint={"every": 3})

    uninterrupted = train_curve(config(before), 2, tmp_path / "straight")
    root = tmp_path / "moved"
    spawn(_train_then_crash, 2, config(before).model_dump_json(), str(root / "ckpt"), 3, tmp=root)
    resumed = train_curve(config(after), 2, root)
    assert [m["step"] for m in resumed if "loss" in m] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[3:], rel=1e-4)
    assert losses(resumed, "val_loss") == pytest.approx(losses(uninterrupted, "val_loss")[-1:], rel=1e-4)  # step 6
