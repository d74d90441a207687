"""How a trial's segment restores (tune.trial), on a real tiny trainer in this process (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainers.config import TrainerConfig
from trainers.loop import restore_keeping_config_hparams
from trainers.reporter import LocalReporter
from trainers.run import build
from tune.trial import ResumeFromReporter, TimedLoad, plan_segment, run_segment


def config(**optim) -> TrainerConfig:
    return TrainerConfig.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32, "dropout_resid": 0.1},
        "data": {"source": "synthetic", "synthetic_docs": 200, "synthetic_mean_len": 20},
        "train": {"steps": 8, "micro_batch_size": 2, "seq_len": 16, "val_every": 4, "val_batches": 1, "log_every": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", **optim},
        "checkpoint": {"every": 4},
    })


def segment(cfg: TrainerConfig, root: Path, stop_at: int, resume_from: Path | None = None) -> LocalReporter:
    local = LocalReporter(root)
    run_segment(cfg, ResumeFromReporter(local, str(resume_from) if resume_from else None), stop_at)
    return local


def test_segment_stops_at_its_checkpoint(tmp_path):
    local = segment(config(), tmp_path / "a", stop_at=4)
    assert [m["step"] for m in local.metrics if "loss" in m] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint_4"]


def test_failure_mode_exploiting_trial_restores_the_donors_checkpoint_not_its_own(tmp_path):
    """The recipient has its own checkpoint at step 4 (other weights); its next segment gets fresh
    storage, so it continues from the donor's checkpoint: the same losses as the donor continuing."""
    donor_cfg, recipient_cfg = config(lr=1e-2), config(lr=3e-2, weight_decay=0.0)
    segment(donor_cfg, tmp_path / "donor" / "segment_000", stop_at=4)
    own = tmp_path / "recipient" / "segment_000"
    segment(recipient_cfg, own, stop_at=4)
    donor_ckpt = tmp_path / "donor" / "segment_000" / "checkpoint_4"

    nxt = plan_segment(tmp_path / "recipient", 1, 4, 4, 8)
    assert nxt.storage != own and not nxt.storage.exists() and (nxt.start, nxt.stop) == (4, 8)
    donor_goes_on = segment(donor_cfg, tmp_path / "donor" / "segment_001", stop_at=8, resume_from=donor_ckpt)
    recipient = segment(donor_cfg, nxt.storage, stop_at=8, resume_from=donor_ckpt)
    from_own = segment(donor_cfg, tmp_path / "stale", stop_at=8, resume_from=own / "checkpoint_4")
    losses = lambda r: [m["loss"] for m in r.metrics if "loss" in m]  # noqa: E731
    assert [m["step"] for m in recipient.metrics if "loss" in m] == [5, 6, 7, 8]
    assert losses(recipient) == pytest.approx(losses(donor_goes_on), rel=1e-6)
    assert losses(from_own)[0] != pytest.approx(losses(recipient)[0], rel=1e-3)


def test_failure_mode_trial_exploited_before_it_ever_checkpointed_starts_from_the_donor(tmp_path):
    segment(config(), tmp_path / "donor", stop_at=4)
    fresh = segment(config(lr=2e-2), tmp_path / "never_checkpointed", stop_at=8, resume_from=tmp_path / "donor" / "checkpoint_4")
    assert [m["step"] for m in fresh.metrics if "loss" in m] == [5, 6, 7, 8]
    assert all(m["step"] > 4 for m in fresh.metrics)  # no step-0 validation either: it resumed


def test_failure_mode_perturbed_values_survive_the_restore(tmp_path):
    """A torch optimizer's state_dict carries its param groups: loading the donor's checkpoint would bring
    back its weight decay and betas. The explored values of the config must win; the moments must load."""
    segment(config(weight_decay=0.1, betas=(0.9, 0.95)), tmp_path / "donor", stop_at=4)
    ckpt = tmp_path / "donor" / "checkpoint_4"
    perturbed = config(weight_decay=0.02, betas=(0.8, 0.9), lr=5e-3)

    plain = build(perturbed).engine
    plain.load(ckpt)
    assert plain.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1)  # the bug, without the guard

    guarded = build(perturbed)
    guarded.engine = TimedLoad(guarded.engine)  # as a segment's trainee is
    state = restore_keeping_config_hparams(guarded, ckpt)
    groups = guarded.optimizer.param_groups
    assert state.step == 4 and guarded.engine.restore_seconds is not None
    assert groups[0]["weight_decay"] == pytest.approx(0.02) and groups[1]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.9) for g in groups)
    moments = [s["exp_avg"] for s in guarded.optimizer.state.values()]
    assert moments and all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, plain.optimizer.state.values()))
    assert guarded.model.layers[0].resid_dropout.p == pytest.approx(0.1)
