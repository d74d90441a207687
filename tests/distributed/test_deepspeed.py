"""DeepSpeed ZeRO 1, 2 and 3 on two ranks train the same model as one process on the same global batch, a
ZeRO run killed after a checkpoint resumes to the same losses, and what DeepSpeed cannot run is refused: at
config time, and when resuming from a checkpoint it cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config
from tests.distributed.spawn import spawn
from tests.distributed.test_data_parallel import _train, _train_then_crash, losses, small_config, train_curve
from trainers.checkpoint import CheckpointError
from trainers.config import TrainerConfig
from trainers.reporter import LocalReporter
from trainers.run import run

STEPS = 5
STAGES = (1, 2, 3)
LAYOUTS = {**{f"zero{stage}": {"stage": stage} for stage in STAGES},
           # ZeRO-3 gathers each linear's weights again when the block is recomputed in the backward pass
           "zero3-ac": {"stage": 3, "activation_checkpointing": True}}


def config(world: int, stage: int, activation_checkpointing: bool = False, **sections):
    # 16 rows per optimizer step in every layout: 1 rank x 8 rows x 2 micro-batches, or 2 ranks x 4 x 2.
    # The gradient norm grows from 0.47 to 0.69 over the 5 steps: a clip at 0.55 compares DeepSpeed's
    # clipping (steps 3-5) with torch's as well as its unclipped update (steps 1-2).
    parallel = {"engine": "deepspeed", "zero_stage": stage} if world > 1 else {}
    parallel["activation_checkpointing"] = activation_checkpointing
    return small_config(8 // world, 2, train={"steps": STEPS, "grad_clip": 0.55}, parallel=parallel, **sections)


def _train_each(runs: list[tuple[str, str, str]]) -> None:
    for cfg_json, root, out in runs:
        _train(cfg_json, root, out)


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("single")


@pytest.fixture(scope="module")
def single(single_dir):
    """One process, fsdp engine; its checkpoint of the last step is under single_dir/ckpt."""
    return train_curve(config(1, 0), 1, single_dir)


@pytest.fixture(scope="module")
def zero_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zero")


@pytest.fixture(scope="module")
def zero(zero_dir):
    """Each layout's curve, all trained by one pair of processes: starting two processes that import torch
    and DeepSpeed costs about 8 s of CPU, more than one of these runs. Each layout's checkpoint of the last
    step is under zero_dir/ckpt-LAYOUT."""
    runs = [(config(2, **layout).model_dump_json(), str(zero_dir / f"ckpt-{name}"), str(zero_dir / f"metrics-{name}.json"))
            for name, layout in LAYOUTS.items()]
    spawn(_train_each, 2, runs, tmp=zero_dir)
    return {name: json.loads(Path(out).read_text()) for name, (_, _, out) in zip(LAYOUTS, runs)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_matches_single_process(single, zero, layout):
    assert len(losses(single)) == STEPS
    assert losses(zero[layout]) == pytest.approx(losses(single), rel=1e-4)
    assert losses(zero[layout], "grad_norm") == pytest.approx(losses(single, "grad_norm"), rel=1e-4)
    assert losses(zero[layout], "val_loss") == pytest.approx(losses(single, "val_loss"), rel=1e-4)
    assert losses(single)[-1] < losses(single)[0]  # it learns, so the comparison is not between two flat lines


def test_zero3_resume_after_crash_matches_uninterrupted_run(tmp_path):
    # ZeRO-3: every rank's checkpoint holds only its partition of the weights as well as of the optimizer.
    # Dropout makes the RNG state part of what must be restored exactly.
    cfg = config(2, 3, checkpoint={"every": 2}, model={"dropout_resid": 0.1, "dropout_embed": 0.1})
    uninterrupted = train_curve(cfg, 2, tmp_path / "a")
    root = tmp_path / "b"
    spawn(_train_then_crash, 2, cfg.model_dump_json(), str(root / "ckpt"), 3, tmp=root)  # step 3 is lost
    assert sorted(p.name for p in (root / "ckpt").glob("checkpoint_*")) == ["checkpoint_2"]
    resumed = train_curve(cfg, 2, root)
    assert [m["step"] for m in resumed if "loss" in m] == [3, 4, 5]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[2:], rel=1e-6)


@pytest.mark.parametrize("parallel, must_mention", [
    ({"zero_stage": 2}, None),
    ({"zero_stage": 0}, ["parallel.zero_stage = 0", "stage 1, 2 or 3"]),
    ({"zero_stage": 3, "tp": 2, "dp_shard": 1}, None),  # AutoTP: tests/distributed/test_deepspeed_tp.py
    ({"zero_stage": 1, "sp": 2, "dp_shard": 1}, None),  # Ulysses: tests/distributed/test_sequence_parallel.py
    ({"zero_stage": 1, "dp_replicate": 2, "dp_shard": 1}, ["parallel.dp_replicate = 2", "one data-parallel group"]),
    ({"zero_stage": 1, "pp": 2, "dp_shard": 1}, ["parallel.pp = 2", "not supported with parallel.engine=deepspeed"]),
    ({"zero_stage": 3, "activation_checkpointing": True}, None),
    ({"zero_stage": 2, "compile": True}, ["parallel.compile = true", "parallel.engine=fsdp"]),
])
def test_config_refuses_what_zero_cannot_run(tmp_path, parallel, must_mention):
    path = tmp_path / "run.yaml"
    path.write_text("cluster:\n  num_workers: 2\n")
    overrides = ["parallel.engine=deepspeed"] + [f"parallel.{k}={v}" for k, v in parallel.items()]
    if must_mention is None:
        assert load_config(path, overrides).parallel.zero_stage == parallel["zero_stage"]
        return
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    for text in must_mention:
        assert text in str(err.value)


def test_config_refuses_zero_stage_without_deepspeed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  zero_stage: 2\n")
    with pytest.raises(ConfigError, match="parallel.zero_stage = 2: only parallel.engine=deepspeed reads it"):
        load_config(path)


def _resume_each(runs: list[tuple[str, str]], out: str) -> None:
    """Run each (config, checkpoint root), which resumes from the root's checkpoint; write what each raised."""
    refusals = []
    for cfg_json, root in runs:
        try:
            run(TrainerConfig.model_validate_json(cfg_json), LocalReporter(Path(root)))
            refusals.append(None)
        except CheckpointError as err:
            refusals.append(str(err))
    Path(out).write_text(json.dumps(refusals))


def test_resume_refuses_checkpoints_zero_cannot_load(single, single_dir, zero, zero_dir, tmp_path):
    """README: a deepspeed run resumes only from a checkpoint of the deepspeed engine on the same world. Here
    one deepspeed rank is pointed at the fsdp engine's checkpoint and at a ZeRO-2 checkpoint of two ranks: both
    are refused when loaded (DeepSpeed itself would start from the current weights instead)."""
    shutil.copytree(single_dir / "ckpt", tmp_path / "fsdp")
    shutil.copytree(zero_dir / "ckpt-zero2", tmp_path / "zero2")
    one_rank = small_config(8, 2, train={"steps": STEPS + 1}, parallel={"engine": "deepspeed", "zero_stage": 2})
    out = tmp_path / "refusals.json"
    spawn(_resume_each, 1, [(one_rank.model_dump_json(), str(tmp_path / name)) for name in ("fsdp", "zero2")],
          str(out), tmp=tmp_path)
    from_fsdp, from_two_ranks = json.loads(out.read_text())
    assert from_fsdp is not None and "holds 0 ZeRO optimizer partitions, this run has 1 ranks" in from_fsdp
    assert from_two_ranks is not None and "holds 2 ZeRO optimizer partitions, this run has 1 ranks" in from_two_ranks
    assert "resumes only with the engine and world that wrote it" in from_two_ranks
