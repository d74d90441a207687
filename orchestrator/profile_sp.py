"""`flotilla profile CONFIG --out cost.json`: the adaptive SP cost model of this config on these devices.

Starts parallel.sp processes on this machine (gloo on CPUs, NCCL with cluster.use_gpu), builds the real
trainer in each, and runs trainers.parallel.adaptive.profile there; rank 0 writes the fitted cost model as
JSON, for `parallel.adaptive.cost_model: PATH`. Model states and activations per token come from the same
arithmetic as `flotilla plan` (orchestrator.plan), the memory cap from the device (or --memory-cap-gb).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import Config
from orchestrator.plan import COMPUTE_BYTES, activation_bytes, count_params
from trainers.config import TrainerConfig
from trainers.parallel.adaptive.cost import GB, CostModel

PROFILE_FRACTION_OF_MEMORY = 0.9  # of a GPU's memory; the rest for the CUDA context and the allocator's slack


def default_lengths(max_len: int) -> list[int]:
    """Powers of two from 32 up to max_len (and max_len itself): enough spread to separate s^2 from s."""
    out, n = [], 32
    while n < max_len:
        out.append(n)
        n *= 2
    return out + [max_len]


def alltoall_bytes_per_token(config: Config, degree: int) -> float:
    """What one device sends per token it holds over a forward and backward: q, k, v and the output per layer,
    each way; k and v at full width when their heads are repeated for the group (fewer kv heads than ranks)."""
    m = config.model
    kv = m.kv_heads * m.head_dim if m.kv_heads % degree == 0 else m.dim
    return 2 * m.n_layers * (2 * m.dim + 2 * kv) * COMPUTE_BYTES[config.train.dtype]


def _worker(rank: int, world: int, port: int, trainer_json: str, use_gpu: bool, lengths: list[int], result: str) -> None:
    from trainers.parallel.adaptive.cost import degrees_up_to
    from trainers.parallel.adaptive.profile import fit_compute, time_alltoall, time_sequences
    from trainers.run import build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world)
    try:
        trainee = build(TrainerConfig.model_validate_json(trainer_json), use_gpu=use_gpu)
        ms = time_sequences(trainee, lengths)
        by_degree = {d: time_sequences(trainee, lengths, d) for d in degrees_up_to(world)[1:]}
        links = time_alltoall(world, trainee.device)
        if rank == 0:
            a1, a2, b = fit_compute(lengths, ms)
            Path(result).write_text(json.dumps({"a1": a1, "a2": a2, "b": b, "lengths": lengths, "ms": ms,
                                                "alltoall": {str(d): v for d, v in links.items()},
                                                "by_degree": {str(d): fit_compute(lengths, v) for d, v in by_degree.items()},
                                                "by_degree_ms": {str(d): v for d, v in by_degree.items()}}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def profile(config: Config, out: Path, lengths: list[int] | None = None, memory_cap_gb: float | None = None) -> CostModel:
    """Measure, fit, and write the cost model to `out`; returns it."""
    import socket
    import tempfile

    devices = config.parallel.sp
    lengths = lengths or default_lengths(config.train.max_doc_len)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "profile.json"
        trainer = config.model_copy(update={"parallel": config.parallel.model_copy(
            update={"adaptive": config.parallel.adaptive.model_copy(update={"cost_model": "flexsp-7b"})})})
        trainer_json = TrainerConfig.model_validate(trainer.trainer_sections()).model_dump_json()
        mp.start_processes(_worker, args=(devices, port, trainer_json, config.cluster.use_gpu, lengths, str(result)),
                           nprocs=devices, start_method="spawn")
        measured = json.loads(result.read_text())
    if memory_cap_gb is None:
        if config.cluster.use_gpu:
            memory_cap_gb = torch.cuda.get_device_properties(0).total_memory * PROFILE_FRACTION_OF_MEMORY / GB
        else:
            memory_cap_gb = psutil.virtual_memory().total / devices / GB
    per_token = activation_bytes(config, 1) / (config.train.micro_batch_size * config.train.seq_len)
    largest = max([int(d) for d in measured["alltoall"]] or [1])
    cost = CostModel(
        name=f"profiled:{config.model.dim}x{config.model.n_layers}@{devices}{'gpu' if config.cluster.use_gpu else 'cpu'}",
        attention_ms_per_token2=measured["a1"], linear_ms_per_token=measured["a2"], overhead_ms=measured["b"],
        activation_bytes_per_token=per_token, memory_cap_bytes=memory_cap_gb * GB,
        param_count=count_params(config.model).total, alltoall_bytes_per_token=alltoall_bytes_per_token(config, largest),
        alltoall_gbps={int(d): v[1] for d, v in measured["alltoall"].items()},
        alltoall_latency_ms={int(d): v[0] for d, v in measured["alltoall"].items()},
        alltoall_calls=8 * config.model.n_layers, devices_per_node=_devices_per_node(devices),
        measured_ms={1: (measured["a1"], measured["a2"], measured["b"])}
        | {int(d): tuple(v) for d, v in measured.get("by_degree", {}).items()})
    Path(out).write_text(cost.to_json() + "\n")
    return cost


def _devices_per_node(devices: int) -> int:
    """All the profiled devices are on this machine: one node (rounded up to a power of two)."""
    n = 1
    while n < devices:
        n *= 2
    return n
