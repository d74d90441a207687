"""The adaptive SP cost model: its arithmetic, its JSON, and the profile fit (the measurement itself runs in
tests/distributed-style processes: the slow test below)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import Config
from orchestrator.profile_sp import alltoall_bytes_per_token
from trainers.parallel.adaptive.cost import GB, MB, CostModel, load_cost_model
from trainers.parallel.adaptive.profile import fit_compute


def test_flexsp_7b_is_the_published_figures():
    c = load_cost_model("flexsp-7b")
    # 28 GB cap less 16 B/param of 6.74B params over 64 devices, at 4.48 MB a token
    assert c.max_tokens(1, 64) == pytest.approx((28 * GB - 16 * 6_738_415_616 / 64) / (4.48 * MB))
    assert c.max_tokens(8, 64) == pytest.approx(8 * c.max_tokens(1, 64))
    # one 32k sequence on degree 8: (a1 s^2 + a2 s) / 8 plus 4k tokens x 7/8 x 2 MiB at 96.5 GB/s
    s = 32768
    compute = (5.128e-6 * s * s + 0.184 * s) / 8
    comm = s / 8 * 7 / 8 * 2 * MB / 96.5e9 * 1e3
    assert c.sequence_ms(s, 8) == pytest.approx(compute + comm)
    assert c.sequence_ms(s, 1) == pytest.approx(5.128e-6 * s * s + 0.184 * s)  # no all-to-all alone
    assert c.group_ms([s, 100], 8) == pytest.approx(629 + c.sequence_ms(s, 8) + c.sequence_ms(100, 8))
    assert c.with_token_cap(100).max_tokens(4, 64) == 400


def test_cost_models_round_trip_through_json_and_refuse_unknown_keys(tmp_path):
    c = load_cost_model("flexsp-7b")
    path = tmp_path / "cost.json"
    path.write_text(c.to_json())
    assert load_cost_model(str(path)) == c
    path.write_text(json.dumps({**json.loads(c.to_json()), "speed": 1}))
    with pytest.raises(ValueError, match=r"unknown keys \['speed'\]"):
        load_cost_model(str(path))
    with pytest.raises(FileNotFoundError, match="neither a built-in cost model"):
        load_cost_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="devices_per_node = 6: must be a power of two"):
        CostModel("x", 0, 0, 0, 1, 1, 1, devices_per_node=6)


def test_the_fit_recovers_the_coefficients_of_exact_timings():
    lengths = [32, 64, 128, 256, 512, 1024]
    ms = [2e-4 * s * s + 0.3 * s + 5.0 for s in lengths]
    assert fit_compute(lengths, ms) == pytest.approx((2e-4, 0.3, 5.0), rel=1e-6)
    # a negative intercept is clipped: shorter sequences must never look free
    assert fit_compute(lengths, [0.3 * s - 1.0 for s in lengths])[2] == 0.0


def test_alltoall_bytes_follow_the_heads_the_group_moves():
    config = Config.model_validate({"model": {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2}})
    # per layer, forward and backward: q and out (dim each) and k, v (2 kv heads x 16) in float32
    assert alltoall_bytes_per_token(config, 2) == 2 * 3 * (2 * 64 + 2 * 32) * 4
    # 4 ranks and 2 kv heads: k and v are repeated to all 4 heads before the all-to-all
    assert alltoall_bytes_per_token(config, 4) == 2 * 3 * (4 * 64) * 4


@pytest.mark.slow  # about 40 s: 2 processes build the trainer and time sequences and all-to-alls
def test_profile_writes_a_cost_model_the_planner_loads(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512},
        "data": {"source": "synthetic", "batching": "documents"},
        "train": {"max_doc_len": 512, "tokens_per_step": 2048, "seq_len": 32},
        "parallel": {"sp": 2, "dp_shard": 1, "sp_mode": "adaptive"}, "cluster": {"num_workers": 2}}))
    out = tmp_path / "cost.json"
    assert main(["profile", str(path), "--out", str(out), "--lengths", "64", "128", "256", "512"]) == 0
    cost = load_cost_model(str(out))
    assert set(cost.alltoall_gbps) == {2} and cost.alltoall_gbps[2] > 0
    # some growth with length (at this size the fit may put it all in the quadratic term)
    assert cost.attention_ms_per_token2 + cost.linear_ms_per_token > 0
    assert cost.sequence_ms(512, 1) > cost.sequence_ms(64, 1)
    # each degree measured on its own, Ulysses all-to-alls included
    assert set(cost.measured_ms) == {1, 2} and cost.fixed_ms(2) == cost.measured_ms[2][2] > 0
    assert cost.sequence_ms(512, 2) > cost.sequence_ms(64, 2)


def test_all_to_all_latency_is_paid_once_per_group_not_per_sequence():
    c = CostModel(name="t", attention_ms_per_token2=0.0, linear_ms_per_token=1.0, overhead_ms=10.0,
                  activation_bytes_per_token=1.0, memory_cap_bytes=1e9, param_count=1, alltoall_bytes_per_token=0.0,
                  alltoall_gbps={2: 1.0}, alltoall_latency_ms={2: 0.5}, alltoall_calls=8, devices_per_node=2)
    # a group packs its sequences into one varlen batch: 8 calls of 0.5 ms whatever the count of sequences
    assert c.fixed_ms(2) == 14.0 and c.fixed_ms(1) == 10.0
    assert c.group_ms([100, 100, 100], 2) == pytest.approx(14.0 + 3 * 50.0)
    assert c.group_ms([100, 100, 100], 1) == pytest.approx(10.0 + 300.0)


def test_measured_degrees_replace_the_formula_and_round_trip_through_json(tmp_path):
    c = CostModel(name="t", attention_ms_per_token2=1e-3, linear_ms_per_token=1.0, overhead_ms=10.0,
                  activation_bytes_per_token=1.0, memory_cap_bytes=1e9, param_count=1, alltoall_gbps={2: 1.0, 4: 1.0},
                  devices_per_node=4, measured_ms={2: (0.0, 0.75, 30.0)})
    assert c.sequence_ms(100, 2) == pytest.approx(75.0) and c.fixed_ms(2) == 30.0  # measured: no ideal 1/d
    assert c.sequence_ms(100, 1) == pytest.approx(1e-3 * 100 * 100 + 100)  # formula below the profiled degrees
    # past the largest profiled degree: its timings scaled by 2/4, its b; not the formula (which would say 27.5)
    assert c.sequence_ms(100, 4) == pytest.approx(75.0 / 2) and c.fixed_ms(4) == 30.0
    path = tmp_path / "c.json"
    path.write_text(c.to_json())
    assert load_cost_model(str(path)) == c
