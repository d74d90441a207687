"""The device mesh: named axes pp, dp_replicate, dp_shard, sp, tp whose product is the world size.

`ParallelDims` is pure and checked before any process group exists (the orchestrator calls `validate`
at config time); `build_mesh` then creates the mesh on the initialised process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


def stages_per_rank(pp_schedule: str) -> int:
    """Pipeline stages each pp rank runs: interleaved 1F1B two (virtual stages), the other schedules one."""
    return 2 if pp_schedule == "interleaved_1f1b" else 1


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    dims.validate()
    shape = tuple(dims.degrees()[a] for a in AXES)
    return init_device_mesh(device_type, shape, mesh_dim_names=AXES)


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
