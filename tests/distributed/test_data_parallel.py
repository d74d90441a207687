"""Every data-parallel layout trains the same model as one process on the same global batch, and a run
killed after a checkpoint resumes to the same final loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.distributed.spawn import once_more_after_a_crash, spawn
from trainers.config import TrainerConfig
from trainers.reporter import LocalReporter
from trainers.run import run

STEPS = 6


def small_config(micro_batch_size: int, grad_accum: int, **sections) -> TrainerConfig:
    cfg = {
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"source": "synthetic", "synthetic_docs": 400, "synthetic_mean_len": 24},
        "train": {"steps": STEPS, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "seq_len": 32,
                  "val_every": 3, "val_batches": 2, "seed": 3, "log_every": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return TrainerConfig.model_validate(cfg)


def _train(cfg_json: str, root: str, out: str) -> None:
    reporter = LocalReporter(Path(root))
    run(TrainerConfig.model_validate_json(cfg_json), reporter)
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(reporter.metrics))


def train_curve(cfg: TrainerConfig, world: int, tmp: Path) -> list[dict]:
    def attempt(root: Path) -> list[dict]:
        out = root / f"metrics-{world}.json"
        if world == 1:
            _train(cfg.model_dump_json(), str(root / "ckpt"), str(out))
        else:
            spawn(_train, world, cfg.model_dump_json(), str(root / "ckpt"), str(out), tmp=root)
        return json.loads(out.read_text())
    return once_more_after_a_crash(attempt, tmp)


def losses(metrics: list[dict], key: str = "loss") -> list[float]:
    return [m[key] for m in metrics if key in m]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_curve(small_config(8, 2), 1, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("world, micro, accum", [(2, 8, 1), (2, 4, 2), (4, 4, 1)])
def test_fsdp_matches_single_process(single, tmp_path, world, micro, accum):
    sharded = train_curve(small_config(micro, accum), world, tmp_path)
    assert len(losses(single)) == STEPS
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-4)
    assert losses(sharded, "val_loss") == pytest.approx(losses(single, "val_loss"), rel=1e-4)
    assert losses(sharded, "grad_norm") == pytest.approx(losses(single, "grad_norm"), rel=1e-4)
    assert losses(single)[-1] < losses(single)[0]  # it learns, so the comparison is not between two flat lines


def _train_then_crash(cfg_json: str, root: str, crash_after: int) -> None:
    class Crash(LocalReporter):
        def report(self, steps, checkpoint_dir=None):
            super().report(steps, checkpoint_dir)
            if steps[-1]["step"] == crash_after:
                raise SystemExit("simulated failure")

    try:
        run(TrainerConfig.model_validate_json(cfg_json), Crash(Path(root)))
    except SystemExit:
        pass


def test_resume_after_crash_matches_uninterrupted_run(single, tmp_path):
    # dropout makes the RNG state part of what must be restored exactly
    cfg = small_config(4, 1, checkpoint={"every": 3}, model={"dropout_resid": 0.1, "dropout_embed": 0.1})
    uninterrupted = train_curve(cfg, 2, tmp_path / "a")
    root = tmp_path / "b"
    spawn(_train_then_crash, 2, cfg.model_dump_json(), str(root / "ckpt"), 5, tmp=root)  # steps 4-5 are lost
    assert sorted(p.name for p in (root / "ckpt").glob("checkpoint_*")) == ["checkpoint_3"]
    resumed = train_curve(cfg, 2, root)
    assert [m["step"] for m in resumed if "loss" in m] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(uninterrupted)[3:], rel=1e-6)


def test_resume_keeps_the_new_configs_optimizer_settings(tmp_path):
    from trainers.loop import train
    from trainers.run import build

    first = small_config(4, 1, checkpoint={"every": 3}, train={"steps": 3})
    run(first, LocalReporter(tmp_path))
    changed = small_config(4, 1, checkpoint={"every": 3}, train={"steps": 5}, optim={"weight_decay": 0.5, "eps": 1e-6})
    trainee = build(changed)
    assert train(trainee, LocalReporter(tmp_path)).step == 5  # it resumed (from step 3) and finished
    decay, no_decay = trainee.optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0 and decay["eps"] == 1e-6
