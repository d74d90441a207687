"""Parallelism: the device mesh and one `apply_*` function per kind of parallelism."""

from trainers.parallel.ac import apply_ac
from trainers.parallel.compile import apply_compile
from trainers.parallel.fsdp import apply_fsdp
from trainers.parallel.mesh import ParallelDims, build_mesh, device_for, dp_rank_and_size
from trainers.parallel.tensor import apply_tp

__all__ = ["ParallelDims", "apply_ac", "apply_compile", "apply_fsdp", "apply_tp", "build_mesh", "device_for", "dp_rank_and_size"]
