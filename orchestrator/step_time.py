"""How long one optimizer step of a layout takes, on paper: compute, pipeline bubble and communication.

`estimate_step_time` is pure arithmetic on a validated config and its mesh: the step's FLOPs at what one device
sustains, the idle time of a pipeline, and the bytes and calls of every collective the layout runs, at a link's
bandwidth and latency (`DeviceSpeed`). It ranks layouts (orchestrator.layout_search); bench/layout_estimates.py
checks it against measured runs. Communication is counted as if nothing overlapped it with compute: an upper
bound on its cost, which FSDP's prefetching and the pipeline schedules lower in practice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from orchestrator.plan import COMPUTE_BYTES, FP32, ParamCounts
from trainers.config import TrainerConfig, stages_per_rank
from trainers.parallel.mesh import ParallelDims

GPU_MFU = {False: 0.315, True: 0.405}
"""Model FLOPs utilisation a GPU run sustains, eager and under parallel.compile: Llama 1.1B on one H100, seq 2048,
micro-batch 8, bf16 (DESIGN.md section 9: 31.5% eager, 40.5% torch.compile)."""
NVLINK_BYTES_PER_S, NVLINK_LATENCY_S = 300e9, 20e-6
"""NCCL between the GPUs of one node: an assumed bus bandwidth and per-call latency (NVLink 4 is 450 GB/s each way
on paper); not measured here: `--link-gbps` gives the real one."""
CPU_EFFICIENCY = 0.55
"""The share of a thread's float32 matmul rate (measured by `cpu_speed`) that training sustains on a CPU worker:
attention, norms, elementwise ops and the optimizer run below the matmul rate. configs/tiny.yaml on one thread, in
one process: 65%; its 10 layouts on 4 workers sharing 2 cores, by their CPU time: 52-66% as fitted with the other
constants, and 55% with these gives the smallest error (bench/results/layout_estimates.md)."""
GLOO_BYTES_PER_S, GLOO_LATENCY_S = 1.0e9, 1.0e-3
"""gloo between CPU workers of one machine (loopback TCP), at a whole core each: an all-gather between 2 processes
measured 0.95 GB/s and 0.6 ms a call; 1 ms fits the 4-worker runs better, whose calls wait for peers that share
cores (bench/results/layout_estimates.md)."""
CPU_PASS_S = 5e-3
"""Fixed seconds a CPU worker spends, at a whole core, on one unit (a block, or the root) in one micro-batch's forward
and backward beyond its FLOPs: FSDP2's hooks and DTensor dispatch, mostly (alone in one process a pass costs 0.4 ms).
On configs/tiny.yaml's 4 workers, 4 micro-batches of 2 rows made a step 0.22 s longer than one of 8 (by the workers'
CPU time over the 2 cores): 15 more passes at half a core, with their all-gathers (bench/results/layout_estimates.md)."""
GPU_PASS_S = 2e-4
"""The same on a GPU: assumed, about 40 kernel launches of 5 us a block forward and backward; it matters only
where the kernels are too small to hide their launches (tiny models, micro-batches of a row or two)."""


@dataclass(frozen=True)
class DeviceSpeed:
    """What the estimate assumes one device and its links achieve."""

    flops: float
    """FLOP/s one device sustains on the model's forward and backward passes (a GPU: MFU x its peak)."""
    link_bytes_per_s: float
    """Bytes a second one device sends in a collective (its bus bandwidth)."""
    latency_s: float
    """Fixed cost of one collective call."""
    pass_s: float
    """Fixed cost of one unit (a block, or the root) in one micro-batch's forward and backward, beyond its FLOPs."""
    source: str
    """Where the figures come from, for people."""
    idle_cost: float = 1.0
    """The share of a pipeline stage's idle time that the step loses: all of it on a device of its own; on CPU
    workers that share fewer cores than they are, an idle worker's core runs the others meanwhile."""


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on one device, by what they are spent on."""

    compute: float
    """Forward and backward passes (and the forward recomputed under activation checkpointing)."""
    bubble: float
    """Pipeline stages idle while the schedule fills and drains."""
    communication: float
    """Collectives and pipeline sends: bytes over the link plus a latency a call, none overlapped."""
    overhead: float
    """A fixed cost for each unit in each micro-batch (DeviceSpeed.pass_s)."""
    communication_bytes: float
    """Bytes one device sends in a step."""
    collectives: int
    """Collective calls (and pipeline sends) of one device in a step."""
    passes: float
    """Units x micro-batches: the forward and backward passes of one unit the device runs in a step."""

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.communication + self.overhead


def gpu_speed(peak_flops: float, compiled: bool = False, link_bytes_per_s: float | None = None) -> DeviceSpeed:
    """A GPU of `peak_flops` (dense bf16) at the MFU our runs reach, NCCL over NVLink within a node."""
    mfu = GPU_MFU[compiled]
    link = link_bytes_per_s or NVLINK_BYTES_PER_S
    return DeviceSpeed(peak_flops * mfu, link, NVLINK_LATENCY_S, GPU_PASS_S,
                       f"GPU: {mfu:.1%} MFU of {peak_flops / 1e12:.0f} TFLOP/s peak, links {link / 1e9:.0f} GB/s")


def cpu_speed(config: TrainerConfig, num_workers: int, cpus_per_worker: float, cores: int | None = None,
              link_bytes_per_s: float | None = None, thread_flops: float | None = None) -> DeviceSpeed:
    """A CPU worker of this machine: one thread's float32 rate on the model's MLP matmul, measured here now (about
    0.3 s) unless given, times CPU_EFFICIENCY, times the cores it gets. Ray starts each worker with
    max(1, int(cpus_per_worker)) threads (OMP_NUM_THREADS); where the workers want more threads than the machine has
    cores, they share them, and an idle pipeline stage's core goes to the others."""
    cores = cores or os.cpu_count() or 1
    threads = max(1, int(cpus_per_worker))
    share = min(threads, cores / num_workers)
    rows = min(config.train.micro_batch_size * config.train.seq_len, 4096)
    measured = thread_flops or measure_thread_flops(rows, config.model.dim, config.model.hidden_dim)
    link = link_bytes_per_s or GLOO_BYTES_PER_S
    # every cost here is work of the worker's own threads: at `share` of a core it takes 1 / share as long
    return DeviceSpeed(measured * CPU_EFFICIENCY * share, link * share, GLOO_LATENCY_S / share, CPU_PASS_S / share,
                       f"CPU: {measured / 1e9:.1f} GFLOP/s a thread (float32 matmul of the model's MLP, measured now) "
                       f"x {CPU_EFFICIENCY:.0%} x {share:.2g} of a core a worker ({num_workers} worker(s), {threads} "
                       f"thread(s) each, on {cores} cores); gloo {link / 1e9:.1f} GB/s and "
                       f"{GLOO_LATENCY_S * 1e3:.1f} ms a call, {CPU_PASS_S * 1e3:.1f} ms a unit pass, at a whole core",
                       idle_cost=share / threads)


def measure_thread_flops(rows: int, dim: int, hidden: int, seconds: float = 0.3) -> float:
    """FLOP/s of one thread multiplying float32 (rows, dim) by (dim, hidden) matrices, per second of CPU time: what
    the thread does while it runs, however busy the machine is with other work (then it runs less of the time)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(rows, dim), torch.randn(dim, hidden)
        a @ b  # first call: allocation and dispatch warm-up
        runs, started = 0, time.process_time()
        while (elapsed := time.process_time() - started) < seconds:
            a @ b
            runs += 1
    finally:
        torch.set_num_threads(threads)
    return 2 * rows * dim * hidden * runs / elapsed


def device_speed(config, device_flops: float | None = None, link_gbps: float | None = None) -> DeviceSpeed:
    """What one worker of the (orchestrator) `config` sustains: `device_flops` if given; on GPUs MFU x train.peak_flops
    (or the peak of this machine's GPU, if it is one trainers.metrics knows); on CPUs `cpu_speed` of this machine.
    ValueError where a GPU's speed cannot be known here."""
    link = link_gbps * 1e9 if link_gbps else None
    gpu = config.cluster.use_gpu
    if device_flops:
        link = link or (NVLINK_BYTES_PER_S if gpu else GLOO_BYTES_PER_S)
        latency, pass_s = (NVLINK_LATENCY_S, GPU_PASS_S) if gpu else (GLOO_LATENCY_S, CPU_PASS_S)
        return DeviceSpeed(device_flops, link, latency, pass_s,
                           f"--device-flops {device_flops:.3g} FLOP/s a device, links {link / 1e9:.1f} GB/s")
    if gpu:
        peak = config.train.peak_flops or _local_gpu_peak()
        if peak is None:
            raise ValueError("cluster.use_gpu = true: one GPU's speed is unknown here; set train.peak_flops (its dense "
                             "bf16 peak FLOP/s) or give --device-flops (the FLOP/s it sustains)")
        return gpu_speed(peak, config.parallel.compile, link)
    return cpu_speed(config, config.cluster.num_workers, config.cluster.cpus_per_worker, link_bytes_per_s=link)


def _local_gpu_peak() -> float | None:
    import torch

    from trainers.metrics import PEAK_BF16_FLOPS

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def estimate_step_time(config: TrainerConfig, dims: ParallelDims, counts: ParamCounts, flops_per_step: float,
                       speed: DeviceSpeed) -> StepTime:
    """One step of `config` on the mesh `dims` at `speed`.

    compute: the step's FLOPs (trainers.model.flops_per_token x tokens) split evenly over the world; x 4/3 under
      activation checkpointing (the forward, a third of forward + backward, runs twice).
    bubble: pipeline schedules idle (pp - 1) / (v x m) of the compute, m micro-batches (train.grad_accum), v stages
      a rank (2 for interleaved 1F1B); x speed.idle_cost.
    communication, per device, over m micro-batches of b rows x S tokens (b S / sp on each rank), a bytes an
      element in the compute dtype, P this rank's parameters before sharding (matrices / tp + norm gains, / pp):
      FSDP over n = dp_shard x sp: two all-gathers of the weights a micro-batch (forward, backward), a P (n-1)/n
      each, and a float32 reduce-scatter of the gradients, once a step while gradients accumulate (rows, no
      pipeline) or every micro-batch; dp_replicate r: an all-reduce of the sharded gradients, 2 x 4 P/n (r-1)/r;
      DeepSpeed ZeRO over the world w: stage 1 all-reduces whole gradients once a step, stage 2 reduce-scatters
      them every micro-batch, both all-gather the updated weights; stage 3 gathers the weights twice and
      reduce-scatters every micro-batch;
      tp: 4 collectives a block forward and 4 backward (all-gather, reduce-scatter around attention and the MLP)
      of b S / sp x dim elements, (t-1)/t of it sent;
      Ulysses sp: all-to-alls of q, k, v and the output, forward and backward, (2 dim + 2 kv) / tp wide, (s-1)/s
      sent; ring sp: s-1 passes of k and v forward, twice that backward;
      pp: each micro-batch's activations forward and their gradients backward, v times;
      and 3 small all-reduces a step (the loop's token counts, loss and gradient norm).
    overhead: speed.pass_s for each unit (a block, or the root) a device runs in each micro-batch.
    A collective costs its bytes over the link plus speed.latency_s; FSDP's and ZeRO-3's run unit by unit (a block,
    and the root), the others as counted."""
    m, t, p = config.model, config.train, config.parallel
    a = COMPUTE_BYTES[t.dtype]
    micro = t.grad_accum
    v = stages_per_rank(p.pp_schedule) if dims.pp > 1 else 1
    layers = m.n_layers / dims.pp
    units = layers + 1
    rows = t.micro_batch_size * t.seq_len
    if config.data.batching == "documents":  # the step's token budget over the data-parallel units
        rows = t.tokens_per_step / dims.dp / micro
    tokens = rows / dims.sp  # one micro-batch on one rank
    kv = m.kv_heads * m.head_dim

    compute = flops_per_step / dims.world_size / speed.flops
    if p.activation_checkpointing:
        compute *= 4 / 3
    bubble = compute * (dims.pp - 1) / (v * micro) * speed.idle_cost if dims.pp > 1 else 0.0

    sent: list[tuple[float, float]] = []  # (bytes, calls)
    if p.engine == "deepspeed":
        w, n = dims.world_size, counts.total
        part = n * a * (w - 1) / w
        if w > 1:
            if p.zero_stage == 1:
                sent += [(2 * part, units), (part, units)]
            elif p.zero_stage == 2:
                sent += [(micro * part, micro * units), (part, units)]
            else:
                sent += [(3 * micro * part, 3 * micro * units)]
    else:
        stage = (counts.matrices / dims.tp + counts.vectors) / dims.pp
        n = dims.dp_shard * dims.sp
        wrapped = dims.pp == 1 or dims.dp > 1
        accumulates = micro > 1 and dims.pp == 1 and config.data.batching == "rows"
        reductions = 1 if accumulates else micro
        if wrapped and n > 1:
            sent += [(2 * micro * a * stage * (n - 1) / n, 2 * micro * units),
                     (reductions * FP32 * stage * (n - 1) / n, reductions * units)]
        if dims.dp_replicate > 1:
            r = dims.dp_replicate
            sent.append((reductions * 2 * FP32 * stage / n * (r - 1) / r, reductions * units))
    if dims.tp > 1:
        sent.append((micro * 8 * layers * tokens * m.dim * a * (dims.tp - 1) / dims.tp, micro * 8 * layers))
    if dims.sp > 1 and p.sp_mode in ("ulysses", "adaptive"):  # adaptive: as if one group spanned the domain
        width = (2 * m.dim + 2 * kv) / dims.tp
        sent.append((micro * 2 * layers * tokens * width * a * (dims.sp - 1) / dims.sp, micro * 8 * layers))
    elif dims.sp > 1 and p.sp_mode == "ring":
        passes = 3 * (dims.sp - 1)
        sent.append((micro * layers * passes * tokens * 2 * kv / dims.tp * a, micro * layers * passes))
    if dims.pp > 1:
        sent.append((micro * 2 * v * rows * m.dim * a, micro * 2 * v))
    if dims.world_size > 1:
        sent.append((0.0, 3))  # the loop's all-reduces of token counts, loss and gradient norm
    total_bytes = sum(b for b, _ in sent)
    calls = int(sum(c for _, c in sent))
    communication = total_bytes / speed.link_bytes_per_s + calls * speed.latency_s
    passes = micro * units
    return StepTime(compute, bubble, communication, passes * speed.pass_s, total_bytes, calls, passes)
