"""The adaptive SP cost model: its arithmetic, its JSON, and the profile's pure parts: the micro-batches it
times, the fit of (a1, a2, b), the placement record and the cost model built from measurements. The
measurement itself runs on Ray workers: tests/integration/test_profile.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import Config, ConfigError
from orchestrator.profile_sp import alltoall_bytes_per_token, fit_profile, format_profile, profile_grids, record_path
from trainers.documents import DocumentSequences
from trainers.parallel.adaptive import plan_adaptive
from trainers.parallel.adaptive.cost import GB, MB, CostModel, load_cost_model
from trainers.parallel.adaptive.profile import (fit_compute, fit_error, grid_problem, micro_batch_grid, node_layout,
                                                packed_micro_batch)


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


def test_alltoall_bytes_follow_the_heads_the_group_moves():
    config = Config.model_validate({"model": {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2}})
    # per layer, forward and backward: q and out (dim each) and k, v (2 kv heads x 16) in float32
    assert alltoall_bytes_per_token(config, 2) == 2 * 3 * (2 * 64 + 2 * 32) * 4
    # 4 ranks and 2 kv heads: k and v are repeated to all 4 heads before the all-to-all
    assert alltoall_bytes_per_token(config, 4) == 2 * 3 * (4 * 64) * 4


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


def micro_batch_ms(grid, a1, a2, b):
    """The profile's model of a group's micro-batch of `count` sequences of `length`: b + count (a1 s^2 + a2 s)."""
    return [b + k * (a1 * s * s + a2 * s) for k, s in grid]


def test_the_grid_times_each_length_alone_and_packed_as_many_as_fit():
    assert micro_batch_grid([512, 32, 64, 128, 256, 2048], 512) == [
        (1, 32), (1, 64), (1, 128), (1, 256), (1, 512), (16, 32), (8, 64), (4, 128), (2, 256)]
    assert grid_problem(micro_batch_grid([32, 64, 128], 128)) is None
    # no length fits twice: b and the per-sequence cost cannot be told apart
    assert "only 0 length(s) fit at least twice" in grid_problem(micro_batch_grid([300, 400], 512))
    # one length packed: a1 and a2 cannot be told apart
    assert "only 1 length(s)" in grid_problem(micro_batch_grid([200, 400], 512))


def test_the_fit_recovers_a1_a2_and_b_from_micro_batches_of_several_counts():
    truth = (2e-4, 0.3, 5.0)
    grid = micro_batch_grid([32, 64, 128, 256, 512, 1024], 1024)
    counts, lengths = [k for k, _ in grid], [s for _, s in grid]
    exact = micro_batch_ms(grid, *truth)
    assert fit_compute(counts, lengths, exact) == pytest.approx(truth, rel=1e-6)
    assert fit_error(counts, lengths, exact, truth)["max"] == pytest.approx(0, abs=1e-12)
    # 1% timing noise: each coefficient within 5% (seeded: the same draw every run)
    noisy = np.array(exact) * (1 + 0.01 * np.random.default_rng(0).standard_normal(len(exact)))
    fitted = fit_compute(counts, lengths, noisy.tolist())
    assert fitted == pytest.approx(truth, rel=0.05)
    error = fit_error(counts, lengths, noisy.tolist(), fitted)
    assert 0 < error["median"] < 0.02 and error["median"] <= error["max"] < 0.05
    # a negative term is clipped: shorter sequences, or fewer of them, must never look free
    assert fit_compute(counts, lengths, [max(1e-3, 0.3 * k * s - 1.0) for k, s in grid])[2] == 0.0


def test_b_is_what_a_micro_batch_costs_beyond_its_sequences():
    # the same total tokens as 1 x 512 or 16 x 32: the fit must put the group's fixed cost in b, once, not in
    # every sequence (one-sequence timings alone fold b into the per-sequence terms)
    grid = micro_batch_grid([32, 64, 128, 256, 512], 512)
    counts, lengths = [k for k, _ in grid], [s for _, s in grid]
    a1, a2, b = fit_compute(counts, lengths, micro_batch_ms(grid, 0.0, 0.1, 40.0))
    assert b == pytest.approx(40.0) and a2 == pytest.approx(0.1) and a1 == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_a_profiled_micro_batch_is_the_executors_packed_row_sharded(degree):
    count, length = 3, 10  # 30 tokens, padded to a multiple of the degree as the executor pads
    shards = [packed_micro_batch(count, length, degree, p, vocab_size=50) for p in range(degree)]
    row = -(-count * length // degree) * degree
    assert all(s.tokens.shape == (1, row // degree) for s in shards)
    whole = np.concatenate([s.tokens[0].numpy() for s in shards])
    stream = np.random.default_rng([count, length]).integers(0, 50, count * (length + 1))
    expected = DocumentSequences(stream, np.arange(count) * (length + 1), length).packed(range(count), degree)
    assert (whole == expected.tokens[0].numpy()).all()
    assert shards[0].cu_seqlens.tolist() == [0, 10, 20, 30] + ([row] if row > 30 else [])
    # every sequence's targets carry a loss; only the padding does not
    assert sum(s.num_targets for s in shards) == count * length


def test_a_rank_outside_every_group_runs_a_row_of_padding():
    idle = packed_micro_batch(0, 64, 1, 0, vocab_size=50)
    assert idle.tokens.shape == (1, 1) and idle.num_targets == 0


def test_the_placement_record_follows_where_the_ranks_ran():
    one = node_layout([0, 0, 0, 0])
    assert (one["devices_per_node"], one["spans_nodes"], one["node_degree_cap"]) == (4, [], 4)
    assert one["nodes"] == "node 0: ranks 0-3" and one["ranks_per_node"] == {"0": 4}
    two = node_layout([0, 0, 1, 1])
    assert (two["devices_per_node"], two["spans_nodes"], two["node_degree_cap"]) == (2, [4], 4)
    # nodes of 6 (not a power of two): ranks 4-7 straddle, so only pairs stay within a node
    six = node_layout([0] * 6 + [1] * 6)
    assert (six["devices_per_node"], six["spans_nodes"], six["node_degree_cap"]) == (2, [4, 8], 2)
    assert node_layout([0] * 6)["devices_per_node"] == 4  # one node: its largest group, 4 of the 6
    # ranks not numbered node by node: every pair straddles
    mixed = node_layout([0, 1, 0, 1])
    assert (mixed["devices_per_node"], mixed["spans_nodes"], mixed["node_degree_cap"]) == (1, [2, 4], 1)
    assert node_layout([0, 0, 0, 1])["ranks_per_node"] == {"0": 3, "1": 1}


def adaptive_config(**adaptive) -> Config:
    return Config.model_validate({
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512},
        "data": {"source": "synthetic", "batching": "documents"},
        "train": {"max_doc_len": 512, "tokens_per_step": 2048, "seq_len": 32},
        "parallel": {"sp": 4, "dp_shard": 1, "sp_mode": "adaptive", "adaptive": adaptive},
        "cluster": {"num_workers": 4}})


def test_each_degree_times_groups_of_that_many_devices_worth_of_tokens():
    grids = profile_grids(adaptive_config(max_tokens_per_device=128), [32, 64, 128, 256])
    assert grids[1] == [(1, 32), (1, 64), (1, 128), (4, 32), (2, 64)]
    assert grids[4] == [(1, 32), (1, 64), (1, 128), (1, 256), (16, 32), (8, 64), (4, 128), (2, 256)]
    # without a cap a device holds up to the longest length
    assert max(k * s for k, s in profile_grids(adaptive_config(), [32, 64, 128])[2]) == 256
    with pytest.raises(ConfigError, match=r"degree 1's groups hold at most 100 tokens .* at most 50"):
        profile_grids(adaptive_config(max_tokens_per_device=100), [32, 64, 128])


def test_the_cost_model_is_built_from_the_measurements_and_plans():
    config = adaptive_config()
    per_degree = {1: (1e-4, 0.05, 10.0), 2: (6e-5, 0.03, 25.0), 4: (4e-5, 0.02, 40.0)}
    measured = {"node_of_rank": [0, 0, 1, 1], "max_degree": 4, "device_memory_bytes": 64 * GB, "micro_batches": {},
                "alltoall": {"2": [0.5, 2.0], "4": [0.9, 0.5]}}
    for d, coef in per_degree.items():
        grid = micro_batch_grid([32, 64, 128, 256, 512], d * 512)
        measured["micro_batches"][str(d)] = {"grid": grid, "ms": micro_batch_ms(grid, *coef)}
    result = fit_profile(config, measured)
    cost = CostModel.from_json(result.cost.to_json())
    assert cost == result.cost
    for d, coef in per_degree.items():
        assert cost.measured_ms[d] == pytest.approx(coef, rel=1e-6)
        assert result.record["degrees"][str(d)]["fit_error"]["max"] < 1e-6
    assert (cost.attention_ms_per_token2, cost.linear_ms_per_token, cost.overhead_ms) == pytest.approx(per_degree[1])
    assert cost.devices_per_node == 2 and result.record["spans_nodes"] == [4]
    assert cost.alltoall_gbps == {2: 2.0, 4: 0.5} and cost.alltoall_latency_ms == {2: 0.5, 4: 0.9}
    assert cost.memory_cap_bytes == pytest.approx(32 * GB)  # a node's RAM over its 2 CPU ranks
    assert cost.model_shape == config.model.shape
    assert fit_profile(config, measured, memory_cap_gb=3.0).cost.memory_cap_bytes == 3 * GB
    plan = plan_adaptive([512, 300, 200, 64, 64, 32], 4, cost)
    assert sorted(s for mb in plan.micro_batches for g in mb.groups for s in g.sequences) == list(range(6))
    result.record["seconds"] = 12.0
    text = format_profile(result, Path("runs/cost.json"))
    assert "-> runs/cost.json (measurements: runs/cost.profile.json)" in text
    assert record_path(Path("runs/cost.json")) == Path("runs/cost.profile.json")
    assert "node 0: ranks 0-1, node 1: ranks 2-3" in text and "spans nodes" in text.splitlines()[-1]
