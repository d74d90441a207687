"""Tensor parallelism, alone and under FSDP (2-D: dp_shard x tp), trains the same model as one process on the
same global batch: the same gradients at the first step and the same losses after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed.spawn import once_more_after_a_crash, spawn
from trainers.config import TrainerConfig
from trainers.loop import train
from trainers.reporter import LocalReporter
from trainers.run import build

STEPS = 5


def small_config(micro_batch_size: int, grad_accum: int, **parallel) -> TrainerConfig:
    # n_heads 4 and n_kv_heads 2 split over tp=2 into 2 query heads and 1 kv head per rank (GQA kept);
    # seq_len 32 splits into two sequence shards of 16 between the norms
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"source": "synthetic", "synthetic_docs": 400, "synthetic_mean_len": 24},
        "train": {"steps": STEPS, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "seq_len": 32,
                  "val_every": STEPS, "val_batches": 2, "seed": 3, "log_every": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": parallel,
    })


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(cfg_json: str, root: str, out: str) -> None:
    """Train; rank 0 saves the metrics and every parameter's whole gradient as the first optimizer step saw it,
    gathered from every rank (pipeline stages each hold other parameters)."""
    trainee = build(TrainerConfig.model_validate_json(cfg_json))
    first_grads: dict[str, torch.Tensor] = {}

    def keep_first_grads(optimizer, args, kwargs) -> None:
        if not first_grads:
            # full_tensor() is a collective: every rank gathers, rank 0 writes
            first_grads.update({name: _full(p.grad).detach().clone() for name, p in trainee.model.named_parameters()})

    trainee.optimizer.register_step_pre_hook(keep_first_grads)
    reporter = LocalReporter(Path(root))
    train(trainee, reporter)
    grads = first_grads
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, first_grads)
        grads = {name: grad for part in parts for name, grad in part.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"metrics": reporter.metrics, "grads": grads}, out)


def train_run(cfg: TrainerConfig, world: int, tmp: Path) -> dict:
    def attempt(root: Path) -> dict:
        out = root / f"result-{world}.pt"
        if world == 1:
            _train(cfg.model_dump_json(), str(root / "ckpt"), str(out))
        else:
            spawn(_train, world, cfg.model_dump_json(), str(root / "ckpt"), str(out), tmp=root)
        return torch.load(out, weights_only=True)
    return once_more_after_a_crash(attempt, tmp)


def series(result: dict, key: str) -> list[float]:
    return [m[key] for m in result["metrics"] if key in m]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_run(small_config(8, 2), 1, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("world, micro, accum, parallel", [
    (2, 8, 2, {"tp": 2}),                   # dp = 1: both ranks read all 16 rows
    (4, 4, 2, {"dp_shard": 2, "tp": 2}),    # dp = 2 ranks x 4 rows x 2 micro-batches = 16 rows
    # replication: dp_replicate copies (gradients all-reduced), and HSDP (replicas of dp_shard-sharded groups)
    (2, 4, 2, {"dp_replicate": 2, "dp_shard": 1}),
    (4, 4, 1, {"dp_replicate": 2, "dp_shard": 2}),
    # CPU offload: sharded parameters, gradients and optimizer state in CPU memory (here all of it is)
    (2, 4, 2, {"dp_shard": 2, "cpu_offload": True}),
    # activation checkpointing: recomputed blocks inside FSDP units, and over DTensor shards
    (2, 4, 2, {"dp_shard": 2, "activation_checkpointing": True}),
    (2, 8, 2, {"tp": 2, "activation_checkpointing": True}),
    # torch.compile of each block (about a minute of inductor compiling per process on a CPU)
    pytest.param(2, 4, 2, {"dp_shard": 2, "compile": True}, marks=pytest.mark.slow),
    pytest.param(2, 4, 2, {"dp_shard": 2, "compile": True, "activation_checkpointing": True}, marks=pytest.mark.slow),
], ids=["tp2", "dp_shard2xtp2", "dp_replicate2", "dp_replicate2xdp_shard2", "dp_shard2-offload", "dp_shard2-ac", "tp2-ac", "dp_shard2-compile", "dp_shard2-compile-ac"])
def test_tp_matches_single_process(single, tmp_path, world, micro, accum, parallel):
    assert_same_training(train_run(small_config(micro, accum, **parallel), world, tmp_path), single)


def assert_same_training(result: dict, single: dict, grads: bool = True) -> None:
    """The first step's gradients (when the engine keeps whole ones in p.grad) and every step's loss,
    gradient norm, validation loss and token count of a parallel run are the single process's."""
    if grads:
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert len(series(single, "loss")) == STEPS
    assert series(result, "loss") == pytest.approx(series(single, "loss"), rel=1e-4)
    assert series(result, "grad_norm") == pytest.approx(series(single, "grad_norm"), rel=1e-4)
    assert series(result, "val_loss") == pytest.approx(series(single, "val_loss"), rel=1e-4)
    assert series(result, "tokens_seen") == series(single, "tokens_seen")
    assert series(single, "loss")[-1] < series(single, "loss")[0]  # it learns: not two flat lines compared


def _build_on_nodes(cfg_json: str, nodes: list[int], out_dir: str) -> None:
    """Build with this rank on node nodes[rank] (NODE_RANK, as Ray Train sets it); write what build refused."""
    os.environ["NODE_RANK"] = str(nodes[dist.get_rank()])
    try:
        build(TrainerConfig.model_validate_json(cfg_json))
        refused = ""
    except ValueError as err:
        refused = str(err)
    Path(out_dir, f"rank{dist.get_rank()}.refused").write_text(refused)


@pytest.mark.parametrize("nodes, refused", [([0, 1], True), ([1, 1], False)])
def test_a_tensor_parallel_group_across_nodes_is_refused_on_every_rank(tmp_path, nodes, refused):
    spawn(_build_on_nodes, 2, small_config(8, 2, tp=2).model_dump_json(), nodes, str(tmp_path), tmp=tmp_path)
    messages = [(tmp_path / f"rank{r}.refused").read_text() for r in range(2)]
    if refused:
        assert all("parallel.tp = 2: the tensor-parallel group of ranks 0-1 spans nodes 0, 1" in m for m in messages)
    else:
        assert messages == ["", ""]
