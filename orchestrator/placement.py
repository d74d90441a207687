"""Can the cluster ever hold a run's workers? Asked before the TorchTrainer starts.

Ray waits forever for a placement group that no node can hold: a worker asking for more CPUs or GPUs than
any node has, or for a custom resource no node was started with, leaves the run PENDING with no error.
(Ray Train checks only clusters with an autoscaler config, and only cluster-wide totals, though one
worker's bundle must fit on one node.) So `check_placement` compares each worker's bundle with every node,
or, where an autoscaler says which nodes it may add, with every node type it may add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.config import ClusterConfig, ConfigError

# Resources every node reports that a worker bundle never asks for; left out of messages.
_IMPLICIT = ("memory", "object_store_memory")


class PlacementError(ConfigError):
    """The config asks for workers the cluster can never place; the message names the resource."""


@dataclass
class NodeKind:
    name: str
    resources: dict[str, float]
    count: int | None
    """How many such nodes there are (or may be); None: no limit."""


def worker_bundle(cluster: ClusterConfig) -> dict[str, float]:
    """The resources Ray Train reserves for one worker."""
    bundle = {"CPU": cluster.cpus_per_worker, **cluster.resources}
    if cluster.use_gpu:
        bundle["GPU"] = 1.0
    return bundle


def _fits(bundle: dict[str, float], node: NodeKind) -> int:
    """How many bundles one such node holds (1e-9: Ray's resource amounts are fixed-point to 1e-4)."""
    return min(math.floor(node.resources.get(r, 0) / amount + 1e-9) for r, amount in bundle.items())


def _shown(resources: dict[str, float]) -> str:
    return ", ".join(f"{r}: {v:g}" for r, v in sorted(resources.items())
                     if r not in _IMPLICIT and not r.startswith("node:")) or "nothing"


def _times(count: int | None) -> str:
    return "" if count == 1 else " (x any number)" if count is None else f" (x{count})"


def unplaceable(bundle: dict[str, float], num_workers: int, nodes: list[NodeKind], tp: int = 1) -> str | None:
    """Why `num_workers` workers of `bundle` can never be placed on `nodes`; None when they can. With tp > 1
    each tensor-parallel group of tp workers must sit on one node (trainers.parallel.mesh checks the placement
    Ray made; this, that one exists), so a node counts only the whole groups it holds."""
    nodes_text = "; ".join(f"{n.name}{_times(n.count)} has {_shown(n.resources)}" for n in nodes)
    if not nodes:
        return "the cluster has no nodes alive"
    for resource, amount in bundle.items():
        most = max(n.resources.get(resource, 0) for n in nodes)
        if most < amount:
            had = f"the most any node has is {most:g}" if most else "no node has it at all"
            return (f"each worker needs {resource} = {amount:g}, and {had} (nodes: {nodes_text}); lower the "
                    f"request (cluster.cpus_per_worker, cluster.use_gpu, cluster.resources) or add a node with it "
                    f"(e.g. `ray start --resources '{{\"{resource}\": {amount:g}}}'`)")
    per_node = [_fits(bundle, n) for n in nodes]
    if not any(per_node):
        return (f"no node has all of one worker's {_shown(bundle)} together (nodes: {nodes_text}); one worker's "
                "resources must be on one node")
    if any(n.count is None and k for n, k in zip(nodes, per_node)):
        return None
    room = sum(k * n.count for n, k in zip(nodes, per_node))
    if room < num_workers:
        return (f"cluster.num_workers = {num_workers} workers of {_shown(bundle)} each, and the nodes hold only "
                f"{room} (nodes: {nodes_text}); lower cluster.num_workers or the per-worker request, or add nodes")
    in_groups = [k // tp * tp for k in per_node]
    if any(n.count is None and k for n, k in zip(nodes, in_groups)):
        return None
    grouped = sum(k * n.count for n, k in zip(nodes, in_groups))
    if grouped < num_workers:
        return (f"parallel.tp = {tp} keeps each tensor-parallel group of {tp} workers on one node, and the nodes hold "
                f"only {grouped} of the {num_workers} workers of {_shown(bundle)} in whole groups (nodes: "
                f"{nodes_text}); lower parallel.tp or the per-worker request, or add nodes with room for {tp} workers")
    return None


def cluster_nodes() -> list[NodeKind]:
    """The nodes the connected cluster has, or the node types its autoscaler may start."""
    import ray

    try:
        # Private, but the same record Ray Train's own check reads: the autoscaler's node types and limits.
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # no autoscaler state on this Ray: fall back to the nodes that are there
        config = None
    if config is not None and config.node_group_configs:
        return [NodeKind(g.name, dict(g.resources), None if g.max_count == -1 else g.max_count)
                for g in config.node_group_configs if g.max_count]
    return [NodeKind(f"node {n['NodeID'][:8]} at {n['NodeManagerAddress']}", dict(n["Resources"]), 1)
            for n in ray.nodes() if n["Alive"]]


def check_placement(cluster: ClusterConfig, tp: int = 1) -> None:
    """Raise PlacementError if the connected Ray cluster can never hold this run's workers (in whole
    tensor-parallel groups of `tp` per node)."""
    if problem := unplaceable(worker_bundle(cluster), cluster.num_workers, cluster_nodes(), tp):
        raise PlacementError(f"the Ray cluster cannot place this run's workers: {problem}")
