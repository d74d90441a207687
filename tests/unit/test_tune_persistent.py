"""Pure parts of persistent-worker trials (tune.persistent): which hyperparameter changes rebuild the trainee,
and how a trial's hyperparameters land in the trainer sections and STN settings."""

from __future__ import annotations

import pytest
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


def test_reuse_workers_defaults_off_and_refuses_a_non_boolean():
    mutations = {"optim.lr": {"low": 1e-4, "high": 1e-2}}
    assert TuneConfig(mutations=mutations).reuse_workers is False
    with pytest.raises(ValidationError, match="reuse_workers"):
        TuneConfig(mutations=mutations, reuse_workers="sometimes")
