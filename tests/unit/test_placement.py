"""Whether a run's workers can ever be placed: the pure decision, on synthetic node lists."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.config import ClusterConfig, ConfigError, load_config
from orchestrator.placement import NodeKind, unplaceable, worker_bundle


def node(name, count=1, **resources) -> NodeKind:
    return NodeKind(name, {"memory": 8e9, "object_store_memory": 1e9, f"node:{name}": 1, **resources}, count)


TWO = [node("a", CPU=4, node_a=1), node("b", CPU=4, GPU=2, node_b=1)]


def test_bundle_holds_cpus_gpu_and_custom_resources():
    assert worker_bundle(ClusterConfig(cpus_per_worker=2, use_gpu=True, resources={"node_b": 0.5})) == {
        "CPU": 2, "node_b": 0.5, "GPU": 1}


@pytest.mark.parametrize("bundle, workers", [({"CPU": 1}, 8), ({"CPU": 4}, 2), ({"CPU": 1, "GPU": 1}, 2),
                                             ({"CPU": 2, "node_a": 0.5}, 2)])
def test_placeable(bundle, workers):
    assert unplaceable(bundle, workers, TWO) is None


def test_a_resource_no_node_has_is_named():
    problem = unplaceable({"CPU": 1, "node_c": 1}, 1, TWO)
    assert "each worker needs node_c = 1, and no node has it at all" in problem
    assert "node_a: 1" in problem and "memory" not in problem and "node:a" not in problem


def test_more_than_any_one_node_has_is_named_with_the_largest():
    problem = unplaceable({"CPU": 6}, 1, TWO)  # 8 CPUs in all, but a worker's bundle must fit on one node
    assert "each worker needs CPU = 6, and the most any node has is 4" in problem


def test_resources_split_over_nodes_do_not_fit_one_worker():
    assert "together" in unplaceable({"GPU": 1, "node_a": 1}, 1, TWO)


def test_too_many_workers():
    problem = unplaceable({"CPU": 3}, 3, TWO)
    assert "cluster.num_workers = 3" in problem and "hold only 2" in problem


def test_node_types_an_autoscaler_may_add():
    kinds = [node("head", CPU=2), node("gpu-group", count=4, CPU=16, GPU=8)]
    assert unplaceable({"CPU": 2, "GPU": 1}, 32, kinds) is None
    assert "hold only 32" in unplaceable({"CPU": 2, "GPU": 1}, 33, kinds)
    assert unplaceable({"CPU": 2, "GPU": 1}, 1000, [node("gpu-group", count=None, CPU=16, GPU=8)]) is None


def test_tensor_parallel_groups_need_whole_groups_on_a_node():
    three_and_one = [node("a", CPU=3), node("b", CPU=1)]  # four workers fit, but two as one group of two only
    problem = unplaceable({"CPU": 1}, 4, three_and_one, tp=2)
    assert "parallel.tp = 2" in problem and "only 2 of the 4 workers" in problem
    assert unplaceable({"CPU": 1}, 4, three_and_one, tp=1) is None
    assert unplaceable({"CPU": 1}, 4, [node("a", CPU=2), node("b", CPU=2)], tp=2) is None
    assert unplaceable({"CPU": 1}, 8, [node("gpu-group", count=None, CPU=3)], tp=2) is None  # an autoscaler adds nodes
    assert "only 0 of the 2" in unplaceable({"CPU": 1}, 2, [node("a", CPU=1), node("b", CPU=1)], tp=2)


@pytest.mark.parametrize("resources, message", [
    ({"CPU": 2}, "cluster.resources: CPU = 2.0: set cluster.cpus_per_worker instead"),
    ({"GPU": 1}, "cluster.resources: GPU = 1.0: set cluster.use_gpu instead"),
    ({"node_a": 0}, "cluster.resources: node_a = 0.0: must be a positive amount"),
    ({"node_a": "x"}, "cluster.resources.node_a = 'x': must be a valid number"),
])
def test_bad_resources_are_refused_naming_key_and_value(tmp_path, resources, message):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"cluster": {"resources": resources}}))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert message in str(err.value)
