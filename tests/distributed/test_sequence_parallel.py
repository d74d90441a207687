"""Sequence parallelism, Ulysses and ring, trains the same model as one process on the same global batch of
packed documents: the same gradients at the first step and the same losses after it, under FSDP (alone and
with dp_shard) and under DeepSpeed ZeRO."""

from __future__ import annotations

import pytest

from tests.distributed.test_data_parallel import train_curve
from tests.distributed.test_tensor_parallel import STEPS, assert_same_training, train_run
from trainers.config import TrainerConfig


def config(micro_batch_size: int, grad_accum: int, n_kv_heads: int = 2, **parallel) -> TrainerConfig:
    # seq_len 32 over sp=2: each rank embeds, normalises, projects and scores 16 tokens of every row, and
    # attends over all 32 for half the heads. The synthetic documents (mean 24 tokens) cross the cut.
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": n_kv_heads, "max_seq_len": 64},
        "data": {"source": "synthetic", "synthetic_docs": 400, "synthetic_mean_len": 24},
        "train": {"steps": STEPS, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "seq_len": 32,
                  "val_every": STEPS, "val_batches": 2, "seed": 3, "log_every": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": parallel,
    })


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    return {kv: train_run(config(8, 2, n_kv_heads=kv), 1, tmp_path_factory.mktemp(f"single{kv}")) for kv in (2, 1)}


@pytest.mark.parametrize("world, micro, kv, parallel", [
    (2, 8, 2, {"sp": 2, "dp_shard": 1}),        # dp = 1: both ranks read all 16 rows, half of each
    (2, 8, 1, {"sp": 2, "dp_shard": 1}),        # one kv head for two ranks: each gets its own copy
    (4, 4, 2, {"sp": 2, "dp_shard": 2}),        # dp = 2 ranks x 4 rows x 2 micro-batches, FSDP over dp_shard x sp
    (2, 8, 2, {"sp": 2, "dp_shard": 1, "sp_mode": "ring"}),   # kv chunks round the ring, online softmax
    (4, 8, 1, {"sp": 4, "dp_shard": 1, "sp_mode": "ring"}),   # 4 chunks of 8 tokens: documents span several
    # Ulysses / ring over each TP rank's 2 heads: 4 processes, ~40 s each on 2 cores; -m slow runs them
    pytest.param(4, 8, 2, {"sp": 2, "tp": 2, "dp_shard": 1}, marks=pytest.mark.slow),
    pytest.param(4, 8, 2, {"sp": 2, "tp": 2, "dp_shard": 1, "sp_mode": "ring"}, marks=pytest.mark.slow),
    (4, 4, 2, {"sp": 2, "dp_replicate": 2, "dp_shard": 1}),   # HSDP with sp: replicas x (dp_shard x sp) shards
], ids=["sp2", "sp2-kv1", "dp_shard2xsp2", "ring-sp2", "ring-sp4-kv1", "sp2xtp2", "ring-sp2xtp2", "dp_replicate2xsp2"])
def test_sequence_parallel_matches_single_process(singles, tmp_path, world, micro, kv, parallel):
    assert_same_training(train_run(config(micro, 2, n_kv_heads=kv, **parallel), world, tmp_path), singles[kv])


@pytest.mark.parametrize("stage, mode", [(1, "ulysses"), (3, "ulysses"), (2, "ring")])
def test_sequence_parallel_under_deepspeed_matches_single_process(singles, tmp_path, stage, mode):
    # ZeRO keeps gradients in its own partitions (p.grad is not the whole gradient): compared through the
    # losses, the gradient norm DeepSpeed computes, and the validation loss after the updates.
    cfg = config(8, 2, engine="deepspeed", zero_stage=stage, sp=2, dp_shard=1, sp_mode=mode)
    metrics = train_curve(cfg, 2, tmp_path)
    assert_same_training({"metrics": metrics}, singles[2], grads=False)
