"""The tune section: validated like every other config section, with messages naming key, value, allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from tune.sweep import with_hparams

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, **tune) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "pbt-tiny.yaml").read_text())
    data["tune"].update(tune)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_pbt_tiny_loads_and_hparams_apply():
    config = load_config(ROOT / "configs" / "pbt-tiny.yaml")
    assert config.tune.scheduler == "pbt" and config.tune.num_samples >= 4 and config.tune.quantile_size() == 2
    tuned = with_hparams(config, {"optim.lr": 1e-3, "model.dropout_resid": 0.2})
    assert tuned.optim.lr == 1e-3 and tuned.model.dropout_resid == 0.2 and config.optim.lr == 3e-3


@pytest.mark.parametrize("tune, message", [
    ({"scheduler": "hyperband"}, "tune.scheduler = 'hyperband'"),
    ({"num_samples": 1}, "tune.num_samples = 1"),
    ({"perturbation_interval": 45}, "multiple of train.val_every = 30"),
    ({"perturbation_interval": 120}, "must be below train.steps = 120"),
    ({"mutations": {"optim.lrr": {"low": 1e-4, "high": 1e-2}}}, "tune.mutations.optim.lrr: not a trainer config key"),
    ({"mutations": {"model.dropout_resid": {"low": 0.0, "high": 1.5}}}, "value 1.5 is not valid for model.dropout_resid"),
    ({"mutations": {"optim.lr": {"low": 1e-2, "high": 1e-4}}}, "low = 0.01 must be below high = 0.0001"),
    ({"mutations": {"optim.lr": {"low": 0.0, "high": 1e-2, "log": True}}}, "log = true needs low > 0"),
    ({"scheduler": "pb2", "mutations": {"train.micro_batch_size": {"choices": [2, 4]}}}, "pb2 explores within bounds"),
    ({"perturbation_factors": [1.2, 0.8]}, "need 0 < down < 1 < up"),
    ({"quantile_fraction": 0.7}, "tune.quantile_fraction = 0.7"),
    ({"scheduler": "stn"}, "with scheduler = stn the network learns this itself"),
    ({"scheduler": "stn", "mutations": {"stn.hyper_lrr": {"low": 1e-3, "high": 1e-2}}}, "tune.mutations.stn.hyper_lrr: unknown"),
    ({"scheduler": "stn", "mutations": {"stn.hyper_lr": {"low": 1e-3, "high": 1e-2}}, "stn": {"tuned": []}}, "tune.stn.tuned"),
])
def test_bad_tune_values_are_refused_with_the_key_and_value(tmp_path, tune, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, **tune))
    assert message in str(err.value)


def test_pb2_with_bounds_is_accepted(tmp_path):
    assert load_config(write(tmp_path, scheduler="pb2")).tune.scheduler == "pb2"


def test_random_search_needs_no_decision_interval(tmp_path):
    # random search trains each trial in one segment: an interval at train.steps is no error there
    config = load_config(write(tmp_path, scheduler="random", perturbation_interval=120))
    assert config.tune.scheduler == "random" and config.tune.segment_steps(config.train.steps) == 120
    assert load_config(write(tmp_path, scheduler="pbt")).tune.segment_steps(120) == 30


def test_stn_leaves_to_pbt_only_what_it_does_not_learn(tmp_path):
    # the STN learns what tune.stn.tuned lists; anything else in the space, weight decay included once it is
    # dropped from that list, is PBT's, like the learning rate
    stn = {"tuned": ["dropout_embed", "dropout_attn", "dropout_resid"]}
    mutations = {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                 "optim.weight_decay": {"low": 1e-3, "high": 0.3, "log": True},
                 "stn.init_dropout": {"low": 0.01, "high": 0.3}}
    config = load_config(write(tmp_path, scheduler="stn", stn=stn, mutations=mutations))
    assert set(config.tune.explored()) == {"optim.lr", "optim.weight_decay"}
    with pytest.raises(ConfigError, match="tune.mutations.model.dropout_attn: with scheduler = stn"):
        load_config(write(tmp_path, scheduler="stn", stn=stn, mutations={**mutations, "model.dropout_attn": {"low": 0.0, "high": 0.3}}))


@pytest.mark.parametrize("key", ["activation_checkpointing", "compile"])
def test_stn_refuses_what_its_own_model_does_not_apply(key):
    with pytest.raises(ConfigError, match=f"parallel.{key} = true: STN trials build their own gated model"):
        load_config(ROOT / "configs" / "stn-tiny.yaml", [f"parallel.{key}=true"])
    assert getattr(load_config(ROOT / "configs" / "pbt-tiny.yaml", [f"parallel.{key}=true"]).parallel, key)
