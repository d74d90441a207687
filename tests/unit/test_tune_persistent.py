"""Pure parts of persistent-worker trials (tune.persistent): which hyperparameter changes rebuild the trainee,
and how a trial's hyperparameters land in the trainer sections and STN settings."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tune.config import TuneConfig
from tune.persistent import needs_rebuild, trainer_with_hparams


def test_only_the_learning_rate_is_taken_in_place():
    assert not needs_rebuild({"optim.lr": 1e-3}, {"optim.lr": 2e-3})
    assert needs_rebuild({"optim.lr": 1e-3, "model.dropout_resid": 0.1}, {"optim.lr": 1e-3, "model.dropout_resid": 0.2})
    assert needs_rebuild({"optim.weight_decay": 0.1}, {"optim.weight_decay": 0.05})
    assert needs_rebuild({"stn.hyper_lr": 1e-3}, {"stn.hyper_lr": 2e-3})
    assert not needs_rebuild({"model.dropout_resid": 0.1}, {"model.dropout_resid": 0.1})


def test_hparams_set_trainer_keys_and_stn_settings_without_touching_the_input():
    trainer = {"optim": {"lr": 1e-3, "weight_decay": 0.1}, "model": {"dropout_resid": 0.0}}
    out, stn = trainer_with_hparams(trainer, {"hyper_lr": 3e-3}, {"optim.lr": 5e-3, "model.dropout_resid": 0.2,
                                                                   "stn.hyper_lr": 1e-2})
    assert out == {"optim": {"lr": 5e-3, "weight_decay": 0.1}, "model": {"dropout_resid": 0.2}}
    assert stn == {"hyper_lr": 1e-2}
    assert trainer["optim"]["lr"] == 1e-3


def test_reuse_workers_defaults_on_and_refuses_a_non_boolean():
    mutations = {"optim.lr": {"low": 1e-4, "high": 1e-2}}
    assert TuneConfig(mutations=mutations).reuse_workers is True
    with pytest.raises(ValidationError, match="reuse_workers"):
        TuneConfig(mutations=mutations, reuse_workers="sometimes")


def test_going_on_from_its_own_checkpoint_loads_nothing_but_a_donors_is_loaded(tmp_path):
    """Between segments a persistent trial holds the state it just wrote: going on from that checkpoint
    must not load it back (a restore per segment was a fifth of pbt-tiny's per-segment overhead), and must
    train on exactly as the uninterrupted trainee; an exploit's donor checkpoint is loaded, the explored
    weight decay kept."""
    from trainers.loop import restore_keeping_config_hparams
    from trainers.run import build
    from tune.persistent import InPlaceEngine
    from tests.unit.test_tune_restore import config, segment

    segment(config(), tmp_path / "own", stop_at=4)
    segment(config(weight_decay=0.2), tmp_path / "donor", stop_at=4)
    own, donor = tmp_path / "own" / "checkpoint_4", tmp_path / "donor" / "checkpoint_4"

    trainee = build(config(weight_decay=0.05))
    trainee.engine = InPlaceEngine(trainee.engine)
    trainee.engine.held = own
    before = [p.detach().clone() for p in trainee.model.parameters()]
    state = restore_keeping_config_hparams(trainee, own)
    assert state.step == 4 and trainee.engine.restore_seconds is None
    assert all(torch.equal(a, b) for a, b in zip(before, trainee.model.parameters()))  # nothing loaded

    state = restore_keeping_config_hparams(trainee, donor)
    assert state.step == 4 and trainee.engine.restore_seconds is not None
    assert not all(torch.equal(a, b) for a, b in zip(before, trainee.model.parameters()))
    assert trainee.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.05)


def test_timings_split_segment_wall_into_training_and_overhead():
    from tune.timings import SegmentTimes, Timings

    t = Timings(wall_s=20.0)
    t.add(SegmentTimes(wall_s=5.0, train_s=4.0, startup_s=30.0, restore_s=None), exploited=False)
    t.add(SegmentTimes(wall_s=6.0, train_s=4.0, wait_s=1.5, restore_s=0.5), exploited=True)
    t.copy_s = 0.25
    assert (t.segments, t.startups, t.wait_s) == (2, 1, 1.5)
    assert t.overhead_per_segment_s == pytest.approx(1.5) and t.startup_per_segment_s == pytest.approx(15.0)
    assert t.exploit_s == pytest.approx(0.75) and t.restore_own_s == 0.0
    assert t.summary()["overhead_per_segment_s"] == pytest.approx(1.5)


def test_a_trials_other_ranks_wait_for_rank_0s_decision_at_that_step():
    """The population actor's class, called as its threads are: the other ranks of a multi-worker trial wait
    for what rank 0 shares at their step (no collective held meanwhile), not for a decision of another step."""
    import threading
    import time

    from tune.population import PopulationActor

    actor = PopulationActor(["a", "b"], TuneConfig(mutations={"optim.lr": {"low": 1e-4, "high": 1e-2}}).model_dump(),
                            total_steps=4, slots=2)
    assert actor.shared_decision("a", 2, timeout_s=0.05) is None
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(actor.shared_decision("a", 2, timeout_s=10)))
    waiter.start()
    actor.share("b", 2, {"start": 2, "checkpoint": "b/ckpt", "hparams": {}, "exploited": False})
    actor.share("a", 0, {"start": 0, "checkpoint": None, "hparams": {}, "exploited": False})
    time.sleep(0.1)
    assert got == []  # another trial's, or another step's, decision is not this one
    decision = {"start": 2, "checkpoint": "a/exploit_000002_from_b", "hparams": {"optim.lr": 2e-3}, "exploited": True}
    actor.share("a", 2, decision)
    waiter.join(timeout=5)
    assert got == [decision]
    assert actor.shared_decision("a", 2, timeout_s=0) == decision  # a rank arriving late finds it at once
