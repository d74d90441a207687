"""Pipeline parallelism with each schedule trains the same model as one process on the same global batch:
the same gradients at the first step (gathered from the stages) and the same losses after it."""

from __future__ import annotations

import pytest

from tests.distributed.spawn import spawn
from tests.distributed.test_data_parallel import _train_then_crash, losses, train_curve
from tests.distributed.test_tensor_parallel import STEPS, assert_same_training, train_run
from trainers.config import TrainerConfig


def config(**parallel) -> TrainerConfig:
    # 4 layers: 2 stages of 2 (gpipe, 1f1b) or 4 stages of 1, two per rank (interleaved); 2 micro-batches of 8
    # rows per step, the pipeline's micro-batches
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"source": "synthetic", "synthetic_docs": 400, "synthetic_mean_len": 24},
        "train": {"steps": STEPS, "micro_batch_size": 8, "grad_accum": 2, "seq_len": 32,
                  "val_every": STEPS, "val_batches": 2, "seed": 3, "log_every": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": parallel,
    })


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_run(config(), 1, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b"])
def test_pipeline_matches_single_process(single, tmp_path, schedule):
    result = train_run(config(pp=2, dp_shard=1, pp_schedule=schedule), 2, tmp_path)
    assert_same_training(result, single)


def test_pipeline_with_activation_checkpointing_matches_single_process(single, tmp_path):
    # the stages' blocks recompute in the schedule's backward passes
    result = train_run(config(pp=2, dp_shard=1, pp_schedule="1f1b", activation_checkpointing=True), 2, tmp_path)
    assert_same_training(result, single)


def test_pipeline_with_fsdp_matches_single_process(single, tmp_path):
    # pp=2 x dp_shard=2: each stage's parameters sharded over its 2 data-parallel ranks, 4 rows x 2 each
    cfg = config(pp=2, dp_shard=2, pp_schedule="1f1b")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 4})})
    assert_same_training(train_run(cfg, 4, tmp_path), single)


def test_pipeline_checkpoint_resumes_under_data_parallelism(tmp_path):
    """Stages save under the whole model's parameter names, so a run checkpointed under pp=2 continues under
    dp_shard=2 (same global batch: 2 x 8 rows, or 2 ranks x 2 x 4) with the losses it would have had."""
    every = {"checkpoint": {"every": 3}}
    pp = config(pp=2, dp_shard=1, pp_schedule="1f1b").model_copy(update=every)
    dp = TrainerConfig.model_validate({**config(dp_shard=2).model_dump(), **every,
                                       "train": {**config().train.model_dump(), "micro_batch_size": 4}})
    uninterrupted = train_curve(pp, 2, tmp_path / "a")
    root = tmp_path / "b"
    spawn(_train_then_crash, 2, pp.model_dump_json(), str(root / "ckpt"), 4, tmp=root)  # step 4 is lost
    resumed = train_curve(dp, 2, root)
    assert [m["step"] for m in resumed if "loss" in m] == [4, 5]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[3:], rel=1e-4)
