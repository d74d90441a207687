"""`flotilla profile CONFIG --out cost.json`: the adaptive SP cost model of this config on these devices.

Runs one Ray Train worker per device of the SP domain (parallel.sp) where Ray places them: an embedded local
Ray, or the cluster --address / RAY_ADDRESS names, with the same resources per worker as `flotilla train`
(orchestrator.placement.worker_bundle). Each worker builds the real trainer and runs
trainers.parallel.adaptive.profile.measure; rank 0 reports the timings and every rank's node
(trainers.parallel.mesh.node_of_each_rank) back through Ray (ray.train.report, relayed from the controller as
orchestrator.launch does), so the numbers reach the driver from any node. The driver fits them and writes two files:

- `--out`: the cost model JSON, for `parallel.adaptive.cost_model: PATH` (trainers.parallel.adaptive.cost);
- `<out stem>.profile.json`: what it was fitted from: every micro-batch's time, each degree's fit and its
  relative error, the all-to-alls, and where each rank ran (node_of_rank, the degrees whose groups span nodes).
  The cost model's JSON holds only CostModel's fields (CostModel.from_json refuses others).

Model states and activations per token come from the same arithmetic as `flotilla plan` (orchestrator.plan),
the memory cap from the device rank 0 ran on (or --memory-cap-gb).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError
from orchestrator.plan import COMPUTE_BYTES, activation_bytes, count_params
from trainers.config import TrainerConfig
from trainers.parallel.adaptive.cost import GB, CostModel, degrees_up_to
from trainers.parallel.adaptive.profile import fit_compute, fit_error, grid_problem, micro_batch_grid, node_layout

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


def profile_grids(config: Config, lengths: list[int]) -> dict[int, list[tuple[int, int]]]:
    """The (count, length) micro-batches each degree times. A rank holds at most as many tokens a micro-batch
    as the planner will give it (parallel.adaptive.max_tokens_per_device) or, without that cap, the longest
    length: so a group of degree d holds up to d times that, and each rank's work stays the same at every
    degree. ConfigError where a degree's grid cannot separate a1, a2 and b."""
    per_device = config.parallel.adaptive.max_tokens_per_device or max(lengths)
    grids = {}
    for degree in degrees_up_to(config.parallel.sp):
        grids[degree] = micro_batch_grid(lengths, degree * per_device)
        if problem := grid_problem(grids[degree]):
            raise ConfigError(f"--lengths {' '.join(map(str, lengths))}: degree {degree}'s groups hold at most "
                              f"{degree * per_device} tokens a micro-batch ({degree} x {per_device} a device, "
                              "parallel.adaptive.max_tokens_per_device or the longest length); " + problem +
                              f"; give at least two lengths of at most {degree * per_device // 2}")
    return grids


@dataclass
class Profile:
    cost: CostModel
    """What --out holds."""
    record: dict[str, Any]
    """What <out stem>.profile.json holds: the measurements, fits and placement."""


def record_path(out: Path) -> Path:
    """cost.json -> cost.profile.json, beside it."""
    return Path(out).with_name(Path(out).stem + ".profile.json")


def fit_profile(config: Config, measured: dict[str, Any], memory_cap_gb: float | None = None) -> Profile:
    """The cost model and record from rank 0's measurements (trainers.parallel.adaptive.profile.measure). Pure."""
    layout = node_layout(measured["node_of_rank"])
    degrees, fits = {}, {}
    for d, m in sorted(measured["micro_batches"].items(), key=lambda item: int(item[0])):
        counts, lengths = [k for k, _ in m["grid"]], [s for _, s in m["grid"]]
        fits[int(d)] = fit_compute(counts, lengths, m["ms"])
        a1, a2, b = fits[int(d)]
        degrees[d] = {"a1_ms_per_token2": a1, "a2_ms_per_token": a2, "b_ms": b,
                      "fit_error": fit_error(counts, lengths, m["ms"], fits[int(d)]),
                      "micro_batches": [{"count": k, "length": s, "ms": ms} for (k, s), ms in zip(m["grid"], m["ms"])]}
    links = {int(d): v for d, v in measured["alltoall"].items()}
    devices = config.parallel.sp
    if memory_cap_gb is None:
        if config.cluster.use_gpu:
            memory_cap_gb = measured["device_memory_bytes"] * PROFILE_FRACTION_OF_MEMORY / GB
        else:  # the CPU ranks of a node share its memory (rank 0's node: its RAM was measured)
            nodes = measured["node_of_rank"]
            memory_cap_gb = measured["device_memory_bytes"] / nodes.count(nodes[0]) / GB
    per_token = activation_bytes(config, 1) / (config.train.micro_batch_size * config.train.seq_len)
    a1, a2, b = fits[1]
    cost = CostModel(
        name=f"profiled:{config.model.dim}x{config.model.n_layers}@{devices}{'gpu' if config.cluster.use_gpu else 'cpu'}",
        attention_ms_per_token2=a1, linear_ms_per_token=a2, overhead_ms=b,
        activation_bytes_per_token=per_token, memory_cap_bytes=memory_cap_gb * GB,
        param_count=count_params(config.model).total,
        alltoall_bytes_per_token=alltoall_bytes_per_token(config, max(links, default=1)),
        alltoall_gbps={d: v[1] for d, v in links.items()}, alltoall_latency_ms={d: v[0] for d, v in links.items()},
        alltoall_calls=8 * config.model.n_layers, devices_per_node=layout["devices_per_node"], measured_ms=fits,
        model_shape=config.model.shape)
    record = {"cost_model": cost.name, **layout, "max_degree": measured["max_degree"], "degrees": degrees,
              "alltoall": {str(d): {"latency_ms": v[0], "gbps": v[1]} for d, v in links.items()},
              "memory_cap_gb": memory_cap_gb}
    return Profile(cost, record)


def format_profile(result: Profile, out: Path) -> str:
    """What `flotilla profile` prints: where it wrote, the placement, and one row per degree."""
    r = result.record
    lines = [f"flotilla: cost model {result.cost.name} -> {out} (measurements: {record_path(out)}), "
             f"profiled in {r['seconds']:.0f} s",
             f"  placement: {r['nodes']}; devices_per_node {r['devices_per_node']}; groups of degree at most "
             f"{r['max_degree']}; memory cap {r['memory_cap_gb']:.1f} GB a device",
             f"  {'degree':>6}  {'a1 ms/tok^2':>11}  {'a2 ms/tok':>9}  {'b ms':>8}  {'fit err med/max':>15}  "
             f"{'a2a GB/s':>8}  {'a2a lat ms':>10}"]
    for d, row in r["degrees"].items():
        link = r["alltoall"].get(d)
        gbps, latency = (f"{link['gbps']:.3g}", f"{link['latency_ms']:.3g}") if link else ("-", "-")
        error = f"{row['fit_error']['median']:.1%}/{row['fit_error']['max']:.1%}"
        spans = "  spans nodes" if int(d) in r["spans_nodes"] else ""
        lines.append(f"  {d:>6}  {row['a1_ms_per_token2']:>11.3g}  {row['a2_ms_per_token']:>9.3g}  {row['b_ms']:>8.3g}  "
                     f"{error:>15}  {gbps:>8}  {latency:>10}{spans}")
    return "\n".join(lines)


def profile(config: Config, out: Path, lengths: list[int] | None = None, memory_cap_gb: float | None = None,
            address: str | None = None, quiet: bool = False) -> Profile:
    """Measure on the cluster, fit, and write the cost model to `out` and the record beside it; returns both.
    `address` and `quiet` are orchestrator.ray_connect.connect_ray's."""
    from orchestrator.data import prepare_data
    from orchestrator.placement import check_placement
    from orchestrator.ray_connect import connect_ray

    lengths = sorted(set(lengths or default_lengths(config.train.max_doc_len)))
    grids = profile_grids(config, lengths)
    config = prepare_data(config)
    connect_ray(address, quiet=quiet)
    check_placement(config.cluster)  # before the TorchTrainer: a worker no node can hold would wait forever
    started = time.perf_counter()
    measured = _measure_on_workers(config, grids)
    result = fit_profile(config, measured, memory_cap_gb)
    result.record["seconds"] = time.perf_counter() - started
    Path(out).write_text(result.cost.to_json() + "\n")
    record_path(out).write_text(json.dumps(result.record, indent=2) + "\n")
    return result


def _measure_on_workers(config: Config, grids: dict[int, list[tuple[int, int]]]) -> dict[str, Any]:
    """One Ray Train worker per device runs measure(); rank 0's record, relayed from the controller."""
    import tempfile

    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from orchestrator.placement import worker_bundle
    from orchestrator.relay import relay_callback

    # The cost model the config names is what this profile makes (unset, or perhaps the very file it is about
    # to write); the workers plan nothing with it, so they load a built-in one.
    built_in = config.parallel.adaptive.model_copy(update={"cost_model": "flexsp-7b"})
    parallel = config.parallel.model_copy(update={"adaptive": built_in})
    trainer = config.model_copy(update={"parallel": parallel}).trainer_sections()
    # Ray Train 2.60 returns a run's metrics only with a checkpoint; the controller's callback relays them.
    reports = Queue(actor_options={"num_cpus": 0})
    try:
        with tempfile.TemporaryDirectory(prefix="flotilla-profile-") as storage:
            TorchTrainer(
                _profile_worker,
                train_loop_config={"trainer": trainer, "use_gpu": config.cluster.use_gpu,
                                   "grids": {str(d): g for d, g in grids.items()}},
                torch_config=TorchConfig(backend="nccl" if config.cluster.use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=config.parallel.sp, use_gpu=config.cluster.use_gpu,
                                             resources_per_worker=worker_bundle(config.cluster)),
                run_config=RunConfig(name="flotilla-profile", storage_path=storage,
                                     logging_config=LoggingConfig(log_level="WARNING"),
                                     callbacks=[relay_callback(reports)]),
            ).fit()
        relayed = [reports.get_nowait() for _ in range(reports.qsize())]
    finally:
        reports.shutdown()
    found = [r["profile"] for r in relayed if "profile" in r]
    if not found:
        raise RuntimeError(f"the profile's workers finished without reporting their measurements (relayed: {relayed}); "
                           "rerun with --verbose to see the workers' logs")
    return found[-1]


def _profile_worker(payload: dict[str, Any]) -> None:
    """Each Ray Train worker: build the trainer, measure (a collective), report rank 0's record."""
    import logging

    import ray.train
    import torch.distributed as dist

    from trainers.parallel.adaptive.profile import measure
    from trainers.run import build

    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO (orchestrator.launch)
    trainee = build(TrainerConfig.model_validate(payload["trainer"]), use_gpu=payload["use_gpu"])
    record = measure(trainee, {int(d): [tuple(x) for x in g] for d, g in payload["grids"].items()})
    trainee.adaptive.close()
    # A collective in Ray Train: every rank reports; the controller relays rank 0's.
    ray.train.report({"profile": record} if dist.get_rank() == 0 else {})
