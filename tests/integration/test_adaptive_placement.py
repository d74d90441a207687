"""Adaptive SP on a real two-node Ray cluster on loopback: the workers learn where Ray put each of them, and the
planner never forms a group that straddles a node. Two placements of 4 workers on two 1-CPU nodes:
- half a CPU each: 2 + 2, ranks 0-1 on one node and 2-3 on the other; a group of 4 is both whole nodes, so
  every degree up to 4 is allowed, and degree-2 groups (documents of 49-96 tokens) run within a node;
- 0.3 CPU each: Ray Train packs 3 on one node and 1 on the other; ranks 2-3 (or 0-1) would straddle them, so
  only degree 1 is left (the planner needs every degree below its largest), whatever the cost model prefers.
Each run's node map and group cap are read back from MLflow (sp/node_of_rank/<r>, sp/max_degree)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.integration.test_jobs import client_env, flotilla
from trainers.parallel.adaptive.topology import describe_nodes, node_degree_cap

COST = Path(__file__).parents[1] / "distributed" / "adaptive_sp_cost.json"
STEPS = 3


def config(cpus_per_worker: float, max_doc_len: int, runs: Path) -> dict:
    return {
        "model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128},
        "data": {"source": "synthetic", "synthetic_docs": 300, "synthetic_mean_len": 40, "batching": "documents"},
        # ~150 tokens a step in one micro-batch of 4 x 48 tokens: a document of 49-96 tokens needs a degree-2 group
        "train": {"steps": STEPS, "tokens_per_step": 150, "max_doc_len": max_doc_len, "seq_len": 32, "val_every": 0,
                  "seed": 3, "log_every": 1},
        "parallel": {"sp": 4, "dp_shard": 1, "sp_mode": "adaptive",
                     "adaptive": {"cost_model": str(COST), "max_tokens_per_device": 48}},
        "cluster": {"num_workers": 4, "cpus_per_worker": cpus_per_worker},
        "checkpoint": {"every": 0, "dir": str(runs)},
        "tracking": {"experiment": "placement", "system_metrics": False},
    }


@pytest.mark.slow  # ~50 s a placement on 2 cores (4 workers each importing torch, 3 steps); 114 s for both
@pytest.mark.parametrize("cpus, max_doc_len, per_node, cap", [
    (0.5, 96, [2, 2], 4),
    # documents of at most 48 tokens: one device holds any of them, so the run is feasible at degree 1
    (0.3, 48, [1, 3], 1),
], ids=["2+2", "3+1"])
def test_adaptive_sp_groups_stay_within_the_nodes_ray_chose(ray_cluster, tmp_path, cpus, max_doc_len, per_node, cap):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config(cpus, max_doc_len, tmp_path / "runs")))
    env = client_env(ray_cluster, tmp_path)
    proc = flotilla(["submit", "run.yaml", "--address", ray_cluster.dashboard_url, "--wait",
                     "-o", "tracking.run_name=placed"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"step {STEPS}/{STEPS}" in proc.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("placement").experiment_id])

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    nodes = [int(v) for r in range(4) for v in history(f"sp/node_of_rank/{r}")]
    # the real placement: both nodes, each holding a contiguous block of ranks (Ray Train numbers them node by node)
    assert sorted(nodes.count(n) for n in set(nodes)) == per_node, describe_nodes(nodes)
    assert nodes == sorted(nodes), describe_nodes(nodes)
    assert history("sp/max_degree") == [cap] and node_degree_cap(nodes) == cap
    assert f"adaptive SP on {describe_nodes(nodes)}: groups of degree at most {cap}" in proc.stdout  # rank 0's line
    # no group above the cap: a group of those degrees would have straddled a node
    for d in (2, 4):
        degree_d = history(f"sp/groups_degree_{d}")
        assert len(degree_d) == STEPS and (d <= cap or not any(degree_d)), (d, degree_d)
    if cap > 1:
        assert any(history("sp/groups_degree_2")), "no degree-2 group ran: the placement was not exercised"
