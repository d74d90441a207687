"""Adaptive sequence parallelism trains the same model as one process on the same documents: 4 gloo ranks, one
SP domain of 4, whose steps split into groups of mixed degrees (a document only a degree-4 group can hold, many
short ones in degree-1 and -2 groups); the same first-step gradients, losses, gradient norms and validation
loss, and a run stopped after a checkpoint resumes to the same losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.spawn import spawn
from tests.distributed.test_data_parallel import _train_then_crash, losses, train_curve
from tests.distributed.test_tensor_parallel import STEPS, assert_same_training, series, train_run
from trainers.config import TrainerConfig

TOKEN_CAP = 48
"""Tokens a device holds per micro-batch: degree 1 holds 48, degree 2 96, degree 4 192."""


COST = Path(__file__).with_name("adaptive_sp_cost.json")
"""A small model's cost model (flexsp-7b's 7B model states would not fit one device)."""


def config(sp: int, token_cap: int | None, **train) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
        "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 40, "batching": "documents"},
        "train": {"steps": STEPS, "tokens_per_step": 400, "max_doc_len": 160, "seq_len": 32, "val_every": STEPS,
                  "val_batches": 2, "seed": 3, "log_every": 1, **train},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": {"sp": sp, "dp_shard": 1, "sp_mode": "adaptive", "adaptive": {"cost_model": str(COST), "max_tokens_per_device": token_cap}},
    })


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_run(config(1, None), 1, tmp_path_factory.mktemp("single"))


def test_adaptive_sp_matches_single_process(single, tmp_path):
    result = train_run(config(4, TOKEN_CAP), 4, tmp_path)
    assert_same_training(result, single)
    steps = [m for m in result["metrics"] if "loss" in m]
    # the plans really mixed degrees: degree-4 groups (the long documents) and degree-1 groups, several
    # micro-batches a step (~400 tokens over 4 x 48)
    assert len({d for m in steps for d in (1, 2, 4) if m[f"sp/groups_degree_{d}"]}) >= 2
    assert all(m["sp/micro_batches"] >= 2 for m in steps) and max(m["sp/micro_batches"] for m in steps) >= 3
    assert all(m["sp/estimated_s"] > 0 and m["sp/planning_ms"] >= 0 for m in steps)
    # some micro-batch left a group idle (fewer sequences than groups): its ranks ran on padding, and the
    # losses and gradients above still match
    assert sum(m["sp/idle_groups"] for m in steps) > 0
    assert series(single, "sp/micro_batches") != series(result, "sp/micro_batches")  # one device plans otherwise


@pytest.mark.slow  # ~65 s on 2 cores; resume through the executor (the plan of the next step survives a crash)
def test_adaptive_sp_resumes_from_a_checkpoint_to_the_same_losses(tmp_path):
    cfg = config(4, TOKEN_CAP, steps=6)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every": 3})})
    uninterrupted = train_curve(cfg, 4, tmp_path / "a")
    root = tmp_path / "b"
    spawn(_train_then_crash, 4, cfg.model_dump_json(), str(root / "ckpt"), 5, tmp=root)  # steps 4-5 are lost
    resumed = train_curve(cfg, 4, root)
    assert [m["step"] for m in resumed if "loss" in m] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[3:], rel=1e-6)
