"""`flotilla plan`: what a config will run as, worked out on paper before any process starts.

The mesh and its rank groups, the parameter count, memory per device, the ideal step time and which
implementations run. Pure arithmetic on the validated config: no Ray, no process group, no model built.
The memory figures are estimates for sizing a run (which layout fits, what doubling dp_shard buys), not
allocator-exact numbers: they leave out the CUDA context, allocator fragmentation and communication buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.config import Config
from trainers.attention import FUSED_ATTENTION, ONE_ROW, PACKED_ROWS, AttentionUnsupported, attention_choice
from trainers.config import ModelConfig
from trainers.model import flops_per_token, kernel_choice
from trainers.optim import choose_optimizer
from trainers.parallel.mesh import AXES, ParallelDims

FP32 = 4
COMPUTE_BYTES = {"float32": 4, "bfloat16": 2}
MOMENT_BYTES = {"float32": 4, "bfloat16": 2}  # optim.moments_dtype
BLOCK_KERNELS = {"rms_norm": "RMSNorm", "rope": "RoPE", "swiglu": "SwiGLU"}
GROUPS_SHOWN = 8  # rank groups listed per axis; a 512-rank mesh would print 256 pairs otherwise
MiB = 2**20


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by how tensor parallelism treats them; a tied embedding is counted once."""

    matrices: int
    """Embedding, attention and MLP projections, output: each split over tp."""
    vectors: int
    """RMSNorm gains: replicated on every tensor-parallel rank."""
    largest_unit: int
    """Parameters of the largest FSDP unit (a block, or the root: embeddings, final norm, output)."""

    @property
    def total(self) -> int:
        return self.matrices + self.vectors


@dataclass(frozen=True)
class Memory:
    """Bytes per device, at the peak of a micro-batch's backward pass."""

    params: float
    grads: float
    optimizer: float
    gathered: float
    activations: float
    offloaded: bool = False
    """parallel.cpu_offload: params, grads and optimizer are in CPU memory, not on the device."""
    accumulated: float = 0.0
    """Unsharded gradients FSDP2 holds on the device while micro-batches accumulate (train.grad_accum > 1):
    they are reduce-scattered, unit by unit, into the sharded `grads` only in the last micro-batch's backward,
    so the peak holds the larger of the two, not both."""

    @property
    def total(self) -> float:
        """On the device."""
        if self.offloaded:
            held = self.accumulated
        else:
            held = self.params + max(self.grads, self.accumulated) + self.optimizer
        return held + self.gathered + self.activations


@dataclass(frozen=True)
class Plan:
    dims: ParallelDims
    groups: dict[str, list[list[int]]]
    params: ParamCounts
    memory: Memory
    tokens_per_step: int
    flops_per_step: float
    step_time_s: float | None
    kernels: dict[str, tuple[str, str]]
    """What runs, by what chose it (e.g. 'attention (model.attention = auto)'): (implementation, why)."""
    optimizer: str
    """The optimizer and why (trainers.optim.OptimizerChoice.describe)."""
    device: str = "cpu"
    engine: str = "fsdp"
    zero_stage: int = 0
    activation_checkpointing: bool = False
    moments_dtype: str = "float32"
    grad_accum: int = 1


def rank_groups(dims: ParallelDims) -> dict[str, list[list[int]]]:
    """For each axis of degree > 1, the global ranks of each of its process groups.

    `init_device_mesh` lays ranks out row-major over (pp, dp_replicate, dp_shard, sp, tp), so tp neighbours
    are consecutive ranks (one node's fast links) and pp is the outermost, slowest-varying axis.
    """
    dims.validate()
    degrees = dims.degrees()
    grid = np.arange(dims.world_size).reshape([degrees[a] for a in AXES])
    return {axis: np.moveaxis(grid, i, -1).reshape(-1, degrees[axis]).tolist()
            for i, axis in enumerate(AXES) if degrees[axis] > 1}


def count_params(cfg: ModelConfig) -> ParamCounts:
    """The same count as `num_params(build_model(cfg))`, from the config alone."""
    d, kv = cfg.dim, cfg.kv_heads * cfg.head_dim
    block_matrices = 2 * d * d + 2 * d * kv + 3 * d * cfg.hidden_dim  # wq, wo; wk, wv; w1, w2, w3
    block = block_matrices + 2 * d  # + attention_norm, ffn_norm gains
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)  # tok_embeddings, output
    return ParamCounts(matrices=cfg.n_layers * block_matrices + embeddings, vectors=cfg.n_layers * 2 * d + d,
                       largest_unit=max(block, embeddings + d))


def implementations(config: Config, tp: int) -> dict[str, tuple[str, str]]:
    """What a run of `config` runs on its devices, each with why: 'attention' -> 'triton', 'sdpa', 'ring' or
    the kernel's fallback; 'rms_norm', 'rope', 'swiglu' -> 'triton' or 'torch'.

    For use_gpu the GPU's compute capability decides what `auto` runs (kernels/verified.py); the plan takes
    this machine's GPU as the workers', and says where it has none and so cannot know."""
    device = "cuda" if config.cluster.use_gpu else "cpu"
    m, p = config.model, config.parallel
    # rows pack documents (the loop always passes their boundaries); adaptive SP and document batching run
    # one packed row per micro-batch
    one_row = config.data.batching == "documents" or config.train.micro_batch_size == 1
    try:
        attention = attention_choice(m.attention, device, batch=ONE_ROW if one_row else PACKED_ROWS,
                                     dtype=config.train.dtype, head_dim=m.head_dim, gqa=m.kv_heads < m.n_heads,
                                     dropout=m.dropout_attn)
    except AttentionUnsupported as err:  # the run stops at its first attention call with the same words
        attention = ("none", str(err))
    if p.sp > 1 and p.sp_mode == "ring":
        attention = ("ring", f"ring attention over parallel.sp = {p.sp}")
    chosen = {"attention": attention}
    for kernel in BLOCK_KERNELS:
        chosen[kernel] = (("torch", f"parallel.tp = {tp}: the tensor-parallel shards take the PyTorch code")
                          if tp > 1 else kernel_choice(m.kernels, kernel, device))
    return chosen


def activation_bytes(config: Config, tp: int, sp: int = 1) -> float:
    """Activations kept for backward over one micro-batch on one device, following the implementations
    that will run. Sequence parallelism divides all of it by sp: each rank keeps 1/sp of the tokens (around
    attention, Ulysses holds all of the tokens for 1/sp of the heads; ring keeps its own tokens and all heads).

    Per token and per block, in elements (d = dim, f = MLP hidden, t = tp, kv = kv heads x head dim):
      4d/t   two RMSNorms in PyTorch, each saving its input and normalised output (the Triton kernel keeps
             the input and one float per row: 2d/t); sequence-sharded
      2d     the all-gathered inputs of wq/wk/wv and of w1/w3, saved whole on every tp rank
      4d/t   attention under SDPA on a CPU (and ring): q, k and v repeated to n_heads (the loop always passes
             a document mask, and SDPA's masked kernels take no GQA) and the output; the fused kernels (Triton,
             and on CUDA flash, varlen_attn, FlexAttention) save q, k and v as they are, the output and a
             float32 log-sum-exp per head: (2d + 2kv)/t + lse
      4f/t   SwiGLU in PyTorch: w1 x, w3 x, silu(w1 x) and their product (w2's input); the Triton kernel
             recomputes silu(w1 x): 3f/t
    all in the compute dtype; then the final norm (2d/t or d/t, as above) and the output projection's
    all-gathered input (d), same dtype, and, in float32, the gathered
    logits and their log-softmax (2 * vocab). With parallel.activation_checkpointing a block keeps only its
    input (d/t, sequence-sharded under tp) and its internals exist for one block at a time, while it is
    recomputed in the backward pass, after the logits' buffers are freed: the larger of the two counts.
    Left out: dropout masks (dropout is 0 by default), the norms' float32 upcasts under bf16, the document
    mask and rotary tables. Checked against the unique storages autograd saves, for every combination of
    implementations (tests/unit/test_plan.py; Triton through its interpreter on a CPU).
    """
    m, t, s = config.model, tp, config.train.seq_len
    d, f, kv = m.dim, m.hidden_dim, m.kv_heads * (m.dim // m.n_heads)
    a = COMPUTE_BYTES[config.train.dtype]
    chosen = implementations(config, tp)
    attention = chosen["attention"][0]
    fused = attention in FUSED_ATTENTION
    attention_elements = (2 * d + 2 * kv) / t if fused else 4 * d / t
    lse = m.n_heads / t * FP32 if fused else 0.0
    norm_elements = (1 if chosen["rms_norm"][0] == "triton" else 2) * d / t
    mlp_elements = (3 if chosen["swiglu"][0] == "triton" else 4) * f / t
    per_block = (2 * norm_elements + 2 * d + attention_elements + mlp_elements) * a + lse
    head = (norm_elements + d) * a + 2 * m.vocab_size * FP32
    if config.parallel.activation_checkpointing:
        per_token = m.n_layers * d / t * a + max(per_block, head)
    else:
        per_token = m.n_layers * per_block + head
    return config.train.micro_batch_size * s * per_token / sp


def estimate_memory(config: Config, dims: ParallelDims) -> Memory:
    """Bytes per device: float32 master weights and gradients and AdamW's two moments (float32, or bfloat16 by
    optim.moments_dtype), each parameter split over tp (matrices only) and then over dp_shard x sp (FSDP);
    dp_replicate holds copies.

    FSDP all-gathers one unit at a time for compute; with the next unit prefetched, two units' weights
    (this rank's tp slice, in the compute dtype) are unsharded at once: `gathered`. That holds for one
    worker too: Ray Train starts a process group for any number of workers, so FSDP wraps the model and
    gathers into its own buffers even when there is nothing to shard; pipeline stages are wrapped the same way
    (each of the stage's blocks, and its embedding or final norm and output projection, is a unit).

    Gradient accumulation (packed rows, train.grad_accum > 1, no pipeline): trainers.loop turns FSDP's
    gradient sync off for every micro-batch but the last, and FSDP2 then keeps each unit's gradients unsharded
    across micro-batches, in the reduce dtype (float32: trainers.parallel.fsdp's MixedPrecisionPolicy): this
    rank's tp slice of the whole model, on the device even under cpu_offload: `accumulated`. Pipeline stages
    reduce every micro-batch (the schedule runs our stage modules, not FSDP modules, so it never turns sync
    off), and adaptive SP reduce-scatters after every micro-batch (trainers.loop.adaptive_train_step).
    """
    counts = count_params(config.model)
    if config.parallel.engine == "deepspeed":
        return _deepspeed_memory(config, dims, counts)
    # pp: an even share of the parameters per stage (the first and last stages also hold the embedding and
    # the output projection: the estimate is the average stage, not the largest)
    local = (counts.matrices / dims.tp + counts.vectors) / (dims.dp_shard * dims.sp * dims.pp)
    gathered = 2 * counts.largest_unit / dims.tp * COMPUTE_BYTES[config.train.dtype]
    optimizer = 2 * MOMENT_BYTES[config.optim.moments_dtype] * local
    accumulates = config.train.grad_accum > 1 and dims.pp == 1 and config.data.batching == "rows"
    accumulated = FP32 * (counts.matrices / dims.tp + counts.vectors) if accumulates else 0.0
    return Memory(params=FP32 * local, grads=FP32 * local, optimizer=optimizer, gathered=gathered,
                  activations=activation_bytes(config, dims.tp, dims.sp), offloaded=config.parallel.cpu_offload,
                  accumulated=accumulated)


def _deepspeed_memory(config: Config, dims: ParallelDims, counts: ParamCounts) -> Memory:
    """DeepSpeed ZeRO over all `world` ranks (engine=deepspeed runs no tp or pp). The model's weights and
    gradients are in the compute dtype; the optimizer steps a float32 copy of this rank's 1/world partition
    (DeepSpeed clones it even when training in float32), counted under `params`, with AdamW's two moments.
    Stage 1 partitions the optimizer state, stage 2 the gradients as well, stage 3 the weights too, which it
    gathers one module at a time for compute (two units in flight, like FSDP's prefetch). Left out: the
    gradient buckets DeepSpeed reduces through (reduce_bucket_size, 500M elements by default: a fixed cost
    that matters only for large models).

    Gradient accumulation adds nothing (deepspeed 0.19, runtime/engine.py allreduce_gradients and
    zero/stage_1_and_2.py, zero/stage3.py): stages 2 and 3 reduce each micro-batch's gradients into this
    rank's partition in the backward pass's hooks (their partitions accumulate; stage 3 in a flat buffer of
    partitions), and stage 1 keeps whole gradients in the compute dtype until the step, as it does without
    accumulation."""
    n, world, stage = counts.total, dims.world_size, config.parallel.zero_stage
    compute = COMPUTE_BYTES[config.train.dtype]
    weights = n * compute / (world if stage == 3 else 1)
    grads = n * compute / (world if stage >= 2 else 1)
    gathered = 2 * counts.largest_unit * compute if stage == 3 and world > 1 else 0.0
    return Memory(params=weights + FP32 * n / world, grads=grads, optimizer=2 * FP32 * n / world,
                  gathered=gathered, activations=activation_bytes(config, 1, dims.sp))


def make_plan(config: Config) -> Plan:
    dims = ParallelDims.from_config(config.parallel, config.cluster.num_workers)
    train = config.train
    tokens = train.micro_batch_size * train.grad_accum * dims.dp * train.seq_len
    if config.data.batching == "documents":  # whole documents within the step's budget (at most)
        tokens = train.tokens_per_step
    flops = flops_per_token(config.model, train.seq_len) * tokens
    # every device does 1/world of the step's FLOPs (tp splits each matmul, dp the batch); at 100% of peak
    # this is a lower bound: real runs reach 30-50% MFU on GPUs (PaLM reports 46%)
    step_time = flops / (dims.world_size * train.peak_flops) if train.peak_flops else None
    device = "cuda" if config.cluster.use_gpu else "cpu"
    m = config.model
    labels = {"attention": f"attention (model.attention = {m.attention})",
              **{k: f"{name} (model.kernels = {m.kernels})" for k, name in BLOCK_KERNELS.items()}}
    kernels = {labels[k]: choice for k, choice in implementations(config, dims.tp).items()}
    optimizer = choose_optimizer(config.optim, "cpu" if config.parallel.cpu_offload else device, config.parallel.engine)
    return Plan(dims, rank_groups(dims), count_params(config.model), estimate_memory(config, dims), tokens, flops,
                step_time, kernels, optimizer.describe(), device, config.parallel.engine, config.parallel.zero_stage,
                config.parallel.activation_checkpointing, config.optim.moments_dtype, train.grad_accum)


def format_plan(plan: Plan) -> str:
    dims, mem, p = plan.dims, plan.memory, plan.params
    degrees = "  ".join(f"{a}={d}" for a, d in dims.degrees().items())
    lines = [f"mesh ({dims.world_size} device(s)): {degrees}"]
    if plan.groups:
        lines.append("rank groups:")
        for axis, groups in plan.groups.items():
            shown = " ".join(str(g) for g in groups[:GROUPS_SHOWN])
            more = f" ... ({len(groups)} groups)" if len(groups) > GROUPS_SHOWN else ""
            lines.append(f"  {axis:<13}{shown}{more}")
    lines.append(f"parameters: {p.total:,} ({p.matrices:,} in matrices, split over tp; {p.vectors:,} norm gains)")
    shards = f"sharded over dp_shard={dims.dp_shard} and tp={dims.tp}" + (f" and sp={dims.sp}" if dims.sp > 1 else "")
    host = "; in CPU memory (parallel.cpu_offload), not in the total" if mem.offloaded else ""
    accumulating = (f"float32, unsharded (every unit, tp-sliced) while train.grad_accum = {plan.grad_accum} "
                    "micro-batches accumulate, reduce-scattered into the gradients after the last: the total counts "
                    "the larger, on the device")
    rows = [
        ("parameters", mem.params, f"float32 master weights, {shards}{host}"),
        ("gradients", mem.grads, f"float32, {shards}{host}"),
        *([("accumulated", mem.accumulated, accumulating)] if mem.accumulated else []),
        ("optimizer", mem.optimizer, f"AdamW exp_avg + exp_avg_sq, {plan.moments_dtype}, {shards}{host}"),
        ("gathered", mem.gathered, "FSDP's unsharded working copy of two units (current + prefetched)"),
    ] if plan.engine == "fsdp" else [
        ("parameters", mem.params, f"model weights ({'partitioned' if plan.zero_stage == 3 else 'whole'}) "
                                   f"+ float32 copy of this rank's 1/{dims.world_size} partition"),
        ("gradients", mem.grads, "partitioned" if plan.zero_stage >= 2 else "whole"),
        ("optimizer", mem.optimizer, f"AdamW exp_avg + exp_avg_sq, float32, 1/{dims.world_size} partition"),
        ("gathered", mem.gathered, "ZeRO-3's gathered working copy of two units"),
    ]
    rows += [
        ("activations", mem.activations, "one micro-batch, "
                                         + ("blocks recomputed (activation checkpointing)" if plan.activation_checkpointing
                                            else "no activation checkpointing")),
        ("total", mem.total, ""),
    ]
    lines.append("memory per device (estimate):")
    lines += [f"  {name:<12}{value / MiB:>12,.1f} MiB  {note}".rstrip() for name, value, note in rows]
    step = f"step: {plan.tokens_per_step:,} tokens, {plan.flops_per_step:.3g} FLOPs"
    if plan.step_time_s is None:
        step += ("; step time unknown (set train.peak_flops, the peak FLOP/s of one device; `flotilla plan --search` "
                 "estimates it, on CPUs too)")
    else:
        step += f"; at least {plan.step_time_s:.3g} s (100% of train.peak_flops on every device)"
    lines += [step, f"kernels on {plan.device}:"]
    lines += [f"  {label:<38}{impl}: {why}" for label, (impl, why) in plan.kernels.items()]
    lines.append(f"optimizer: {plan.optimizer}")
    return "\n".join(lines)
