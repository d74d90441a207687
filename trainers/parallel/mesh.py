"""The device mesh: named axes pp, dp_replicate, dp_shard, sp, tp whose product is the world size.

`checked_dims` is pure and checked before any process group exists (the orchestrator calls it with
cluster.num_workers at config time, `build_mesh` with the real world); `build_mesh` then creates the mesh on
the initialised process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainers.config import ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard", "sp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    tp: int = 1

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        return cls(world_size, cfg.pp, cfg.dp_replicate, cfg.resolved_dp_shard(world_size), cfg.sp, cfg.tp)

    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def validate(self) -> None:
        product = 1
        for d in self.degrees().values():
            product *= d
        if product != self.world_size:
            layout = " * ".join(f"{a}={d}" for a, d in self.degrees().items())
            raise ValueError(f"{layout} = {product}, but the world size is {self.world_size}: the degrees must multiply to it")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def layout(self) -> str:
        """Short name of the layout, e.g. 'dp_shard=2' or 'single'; used as an MLflow tag."""
        parts = [f"{a}={d}" for a, d in self.degrees().items() if d > 1]
        return ",".join(parts) or "single"


def checked_dims(cfg: ParallelConfig, world_size: int) -> ParallelDims:
    """The degrees of `cfg` on `world_size` ranks; ValueError where they cannot run there: what a config alone
    cannot say (trainers.config checks the rest)."""
    dims = ParallelDims.from_config(cfg, world_size)
    dims.validate()
    if cfg.sp_mode == "adaptive" and dims.dp_replicate * dims.sp != world_size:
        raise ValueError(f"parallel.sp = {cfg.sp} with parallel.sp_mode = 'adaptive' on {world_size} ranks: the adaptive "
                         f"SP domains (parallel.dp_replicate = {cfg.dp_replicate} of parallel.sp ranks) span every "
                         f"device; set parallel.sp = {world_size // cfg.dp_replicate} (and parallel.dp_shard = 1)")
    return dims


def tp_groups_across_nodes(node_of_rank: list[int], tp: int) -> str | None:
    """Why the tensor-parallel groups would span nodes, or None. tp is the mesh's innermost axis, so its groups
    are runs of tp consecutive ranks; Ray Train (and torchrun) number ranks node by node, so they stay on one
    node when each node holds a multiple of tp workers. TP all-reduces run in every layer, forward and
    backward: across nodes they go over the network instead of NVLink, many times slower."""
    spread = [(start, sorted(set(node_of_rank[start:start + tp]))) for start in range(0, len(node_of_rank), tp)]
    split = [(start, nodes) for start, nodes in spread if len(nodes) > 1]
    if not split:
        return None
    start, nodes = split[0]
    per_node = {n: node_of_rank.count(n) for n in sorted(set(node_of_rank))}
    return (f"parallel.tp = {tp}: the tensor-parallel group of ranks {start}-{start + tp - 1} spans nodes "
            f"{', '.join(map(str, nodes))} ({len(split)} of {len(spread)} groups span nodes); workers per node: "
            f"{', '.join(f'node {n}: {k}' for n, k in per_node.items())}. Each node must hold a multiple of {tp} "
            "workers: give every node room for whole groups (cluster.cpus_per_worker, cluster.resources), or "
            "lower parallel.tp")


def number_nodes(keys: list) -> list[int]:
    """Node numbers 0, 1, ... in order of first appearance, one per rank, from each rank's node key."""
    numbers: dict = {}
    return [numbers.setdefault(key, len(numbers)) for key in keys]


def node_of_each_rank() -> list[int]:
    """Each rank's node, in rank order (number_nodes): a collective, every rank calls it.

    A node is NODE_RANK (Ray Train numbers nodes by IP address, torchrun by --node_rank; unset: one node)
    together with, under Ray, the raylet that started the worker (RAY_RAYLET_PID, which Ray sets in every
    worker's environment). Ray places workers, and Ray Train numbers their ranks, by Ray node, and Ray nodes
    can share an IP address: the loopback cluster of tests/integration, or several raylets on one host, whose
    workers Ray Train gives one NODE_RANK."""
    key = (int(os.environ.get("NODE_RANK", "0")), os.environ.get("RAY_RAYLET_PID", ""))
    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    return number_nodes(keys)


def check_tp_within_nodes(dims: ParallelDims) -> None:
    """Refuse, on every rank, a world whose tensor-parallel groups span nodes (see tp_groups_across_nodes).
    A collective; a rank's node is node_of_each_rank's."""
    if dims.tp == 1:
        return
    if problem := tp_groups_across_nodes(node_of_each_rank(), dims.tp):
        raise ValueError(problem)


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    dims.validate()
    shape = tuple(dims.degrees()[a] for a in AXES)
    return init_device_mesh(device_type, shape, mesh_dim_names=AXES)


def token_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """The ranks holding different tokens of a global batch, this rank among them: dp_replicate x dp_shard x sp
    (dp ranks read different rows, sp ranks different slices of them), within this rank's pp stage and tp
    coordinate, whose ranks hold the same tokens. Loss and count sums run over it; None for one process.
    A collective: every rank calls it, in the same order (it creates the flattened mesh's process group)."""
    if mesh is None:
        return None
    return mesh["dp_replicate", "dp_shard", "sp"]._flatten("dp_sp").get_group()


def dp_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This rank's index among data-parallel ranks (ranks that read different data), and their count."""
    if mesh is None:
        return 0, 1
    coord = dict(zip(mesh.mesh_dim_names, mesh.get_coordinate()))
    shard = mesh["dp_shard"].size()
    return coord["dp_replicate"] * shard + coord["dp_shard"], mesh["dp_replicate"].size() * shard


def device_for(local_rank: int, use_gpu: bool) -> torch.device:
    if use_gpu:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
