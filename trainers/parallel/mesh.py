"""The device mesh: named axes pp, dp_replicate, dp_shard, sp, tp whose product is the world size.

`checked_dims` is pure and checked before any process group exists (the orchestrator calls it with
cluster.num_workers at config time, `build_mesh` with the real world); `build_mesh` then creates the mesh on
the initialised process group.
"""

from __future__ import annotations

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
    if cfg.sp_mode == "adaptive" and dims.sp != world_size:
        raise ValueError(f"parallel.sp = {cfg.sp} with parallel.sp_mode = 'adaptive' on {world_size} ranks: the adaptive "
                         f"SP domain spans every device; set parallel.sp = {world_size} (and parallel.dp_shard = 1)")
    return dims


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
