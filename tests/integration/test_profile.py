"""`flotilla profile` end to end: the real CLI, Ray Train workers on an embedded Ray or on a two-node cluster,
the real trainer timing packed micro-batches, and a cost model the planner runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainers.parallel.adaptive import plan_adaptive
from trainers.parallel.adaptive.cost import CostModel

CONFIG = {
    # dim 64 and lengths up to 512: a micro-batch's compute stands out of the per-micro-batch overhead (FSDP's
    # gloo collectives, the all-to-alls) that a smaller model is all but made of on CPUs
    "model": {"vocab_size": 64, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 512},
    "data": {"source": "synthetic", "batching": "documents"},
    "train": {"max_doc_len": 512, "tokens_per_step": 2048, "seq_len": 32},
    "parallel": {"sp": 2, "dp_shard": 1, "sp_mode": "adaptive"},
    "cluster": {"num_workers": 2, "cpus_per_worker": 0.5},
}
LENGTHS = ["--lengths", "64", "128", "256", "512"]


def flotilla_profile(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`flotilla profile run.yaml --out cost.json ...` in `cwd`; its output, printed with its time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "profile", "run.yaml", "--out", "cost.json", *args],
                          cwd=cwd, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    print(f"flotilla profile: {time.perf_counter() - started:.0f} s\n{done.stdout}")
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def check_cost_model(cwd: Path) -> tuple[CostModel, dict]:
    """The cost model loads, holds each degree's own fit of packed micro-batches, and plans; with its record."""
    cost = CostModel.from_json((cwd / "cost.json").read_text())
    assert cost.model_shape == {"dim": 64, "n_layers": 2, "n_heads": 4, "kv_heads": 2, "vocab_size": 64}
    assert set(cost.measured_ms) == {1, 2}
    for degree, (a1, a2, b) in cost.measured_ms.items():
        assert b > 0, (degree, cost.measured_ms)  # FSDP's collectives alone cost every micro-batch something
        assert a1 >= 0 and a2 >= 0
    assert cost.measured_ms[1][0] + cost.measured_ms[1][1] > 0  # 512 tokens cost more than 64
    assert set(cost.alltoall_gbps) == {2} and cost.alltoall_gbps[2] > 0

    record = json.loads((cwd / "cost.profile.json").read_text())
    for degree in ("1", "2"):
        timed = record["degrees"][degree]["micro_batches"]
        # each length alone and packed as many as a group holds (degree x 512 tokens)
        assert {(m["count"], m["length"]) for m in timed} >= {(1, 64), (1, 512), (int(degree) * 512 // 64, 64)}
        assert all(m["ms"] > 0 for m in timed)
        error = record["degrees"][degree]["fit_error"]
        assert 0 <= error["median"] <= error["max"]

    lengths = [512, 400, 300, 128, 64, 64, 32]
    plan = plan_adaptive(lengths, 2, cost)
    placed = sorted(s for micro in plan.micro_batches for g in micro.groups for s in g.sequences)
    assert placed == list(range(len(lengths))) and plan.estimated_s > 0
    return cost, record


# ~30-50 s on 2 shared cores: an embedded Ray start, 2 workers building the trainer, 15 micro-batches x 4 runs
def test_profile_on_an_embedded_ray_writes_a_cost_model_the_planner_runs(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    out = flotilla_profile(tmp_path, *LENGTHS)
    cost, record = check_cost_model(tmp_path)
    assert record["node_of_rank"] == [0, 0] and record["spans_nodes"] == [] and cost.devices_per_node == 2
    assert "node 0: ranks 0-1" in out and "spans nodes" not in out


@pytest.mark.slow  # a two-node cluster start (~40 s) and the profile on it
def test_profile_on_a_two_node_cluster_records_that_its_pairs_span_nodes(ray_cluster, tmp_path):
    # one CPU a node and a worker each: rank 0 on node_a, rank 1 on node_b; the record comes back through Ray
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**CONFIG, "cluster": {"num_workers": 2, "cpus_per_worker": 1}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    out = flotilla_profile(tmp_path, *LENGTHS, "--address", ray_cluster.gcs_address, env={**env, **ray_cluster.client_env()})
    cost, record = check_cost_model(tmp_path)
    # a pair of whole nodes is a group the planner may form (over the network), flagged as spanning nodes
    assert record["node_of_rank"] == [0, 1] and record["spans_nodes"] == [2] and record["max_degree"] == 2
    assert cost.devices_per_node == 1
    (row_2,) = [line for line in out.splitlines() if line.split()[:1] == ["2"]]  # the table's degree-2 row
    assert "node 0: ranks 0, node 1: ranks 1" in out and row_2.endswith("spans nodes"), out[-3000:]
