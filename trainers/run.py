"""Worker entry: build everything from the config, then run the loop.

Order matters: the model is built on the meta device (no memory), parallelised (sharding decides what
each rank will hold), and only then materialised and initialised, so no rank ever holds the full model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from trainers.attention import get_attention
from trainers.checkpoint import TrainState
from trainers.config import TrainerConfig
from trainers.data import build_splits
from trainers.documents import DocumentBatches, DocumentSequences
from trainers.engines import FSDPEngine, build_deepspeed
from trainers.loop import Trainee, train
from trainers.model import build_model
from trainers.optim import build_optimizer
from trainers.parallel import apply_ac, apply_compile, apply_fsdp, apply_tp, build_mesh, device_for, dp_rank_and_size
from trainers.parallel.adaptive.cost import load_cost_model
from trainers.parallel.adaptive.executor import AdaptiveSequenceParallel, GroupRouter
from trainers.parallel.adaptive.topology import describe_nodes, head_degree_cap, max_group_degree, node_degree_cap
from trainers.parallel.fsdp import apply_fsdp_to_stages
from trainers.parallel.mesh import check_tp_within_nodes, checked_dims, node_of_each_rank, token_group
from trainers.parallel.pipeline import Pipeline, build_shard, tied_group
from trainers.parallel.ring import ring_attention
from trainers.pretrained import initialise
from trainers.parallel.sequence import ulysses_attention
from trainers.reporter import RayReporter, Reporter

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(cfg: TrainerConfig, use_gpu: bool = False, from_pretrained: bool = True) -> Trainee:
    """The trainee of `cfg` on this process's world. What cfg asks for is what runs: the config refused what the
    trainer cannot run when it was validated, and checked_dims refuses degrees that do not fit this world.
    `from_pretrained`: load model.init_from's weights, if set (False: a checkpoint will replace them)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = device_for(int(os.environ.get("LOCAL_RANK", 0)), use_gpu)
    dims = checked_dims(cfg.parallel, world)
    if distributed:
        check_tp_within_nodes(dims)
    mesh = build_mesh(dims, device.type) if distributed else None
    tokens = token_group(mesh)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    sp_rank, sp_size = (mesh["sp"].get_local_rank(), dims.sp) if mesh is not None and dims.sp > 1 else (0, 1)

    adaptive = cfg.parallel.sp_mode == "adaptive"
    train_rows, val_rows, _ = build_splits(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    torch.manual_seed(cfg.train.seed + rank)  # dropout differs per rank; the weights' seeds are initialise's own

    attention = get_attention(cfg.model.attention)
    adaptive_sp = build_adaptive(cfg, train_rows, val_rows, world, rank, device) if adaptive else None
    if adaptive_sp is not None and adaptive_sp.router is not None:
        attention = adaptive_sp.router.attention(attention)
    elif sp_size > 1:
        sp_group = mesh["sp"].get_group()
        attention = ulysses_attention(attention, sp_group) if cfg.parallel.sp_mode == "ulysses" else ring_attention(sp_group)
    model = build_model(cfg.model, device="meta", attention_fn=attention)
    deepspeed = cfg.parallel.engine == "deepspeed"
    offload = cfg.parallel.cpu_offload and mesh is not None
    compute_dtype = COMPUTE_DTYPES[cfg.train.dtype]
    # The order of the apply_* steps: activation checkpointing (a flag on each block, so it holds in every
    # layout) -> pipeline split (this rank keeps its stages' modules, and the steps after see only those) ->
    # tensor parallelism -> compile (sees the TP layouts) -> FSDP (wraps it all).
    if cfg.parallel.activation_checkpointing:
        apply_ac(model)
    if dims.pp > 1:
        model = build_shard(model, mesh["pp"].get_local_rank(), dims.pp, cfg.parallel.pp_schedule)
    if mesh is not None and not deepspeed and dims.tp > 1:
        # TP first: FSDP then shards the TP DTensors again over dp (2-D), the order fully_shard supports
        model = apply_tp(model, mesh["tp"])
    if cfg.parallel.compile:
        apply_compile(model)
    if dims.pp > 1:
        model = apply_fsdp_to_stages(model, mesh, compute_dtype)
    elif mesh is not None and not deepspeed:
        model = apply_fsdp(model, mesh, compute_dtype, cpu_offload=offload)
    model.to_empty(device="cpu" if offload else device)
    initialise(model, cfg.model, cfg.train.seed, from_pretrained)
    if dims.pp > 1:
        return _build_pipeline(cfg, model, mesh, device, train_rows, val_rows, dp_rank, dp_size, sp_rank, sp_size,
                               tokens)
    if offload:  # FSDP moves only parameters to the device for compute; the rotary tables go there once
        model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    # Under the fsdp engine FusedAdamW (where it is chosen) clips inside its step; DeepSpeed clips itself
    fold_clip = None if deepspeed or not cfg.train.grad_clip else cfg.train.grad_clip
    optimizer = build_optimizer(model, cfg.optim, cfg.parallel.engine, max_grad_norm=fold_clip)
    if deepspeed:
        # DeepSpeed wraps the whole model: AutoTP slices its matrices over the tp ranks (parallel.tp), which read
        # the same rows; ZeRO shards it over the other ranks and averages gradients over them, the ranks holding
        # different tokens (dp x sp: the token group), as the loop's normalisation wants.
        return Trainee(cfg, build_deepspeed(cfg, model, optimizer, use_gpu), train_rows, val_rows, device, dp_rank,
                       dp_size, sp_rank=sp_rank, sp_size=sp_size, token_group=tokens)
    autocast = compute_dtype if mesh is None and compute_dtype != torch.float32 else None
    engine = FSDPEngine(model, optimizer, cfg.train.grad_clip)
    trainee = Trainee(cfg, engine, train_rows, val_rows, device, dp_rank, dp_size, autocast, sp_rank, sp_size,
                      token_group=tokens)
    trainee.adaptive = adaptive_sp
    return trainee


def build_adaptive(cfg: TrainerConfig, train_rows, val_rows, world: int, rank: int,
                   device: torch.device) -> AdaptiveSequenceParallel:
    """The executor of parallel.sp_mode = adaptive over the `world` ranks: parallel.dp_replicate SP
    domains of parallel.sp ranks each (one domain of them all by default); the splits as whole documents, the
    cost model, and SP groups no larger than the domain, the attention heads and the real placement allow. Every
    rank learns each rank's node (a collective), so no group straddles a node wherever Ray or torchrun put the
    ranks."""
    settings = cfg.parallel.adaptive
    if settings.cost_model is None:
        raise ValueError("parallel.adaptive.cost_model is unset and no built-in cost model was made for this model: "
                         "profile one (flotilla profile CONFIG --out cost.json) and set it, or name a built-in")
    cost = load_cost_model(settings.cost_model).with_token_cap(settings.max_tokens_per_device)
    distributed = dist.is_available() and dist.is_initialized()
    nodes = node_of_each_rank() if distributed else [0] * world
    domains = cfg.parallel.dp_replicate
    devices = world // domains  # of one SP domain: parallel.sp (checked_dims: domains x sp is the world)
    max_degree = max_group_degree(devices, cfg.model.n_heads, nodes)
    if rank == 0:
        split = f", {domains} SP domains of {devices} ranks" if domains > 1 else ""
        print(f"adaptive SP on {describe_nodes(nodes)}{split}: groups of degree at most {max_degree} (model.n_heads = "
              f"{cfg.model.n_heads} allows {head_degree_cap(cfg.model.n_heads, devices)}, the nodes "
              f"{node_degree_cap(nodes, devices)})", flush=True)
    # The config check knew the heads' cap only; where the placement lowers it, the longest sequence may no longer
    # fit any group: refuse now, on every rank, rather than in the planner at the first long document
    lowered = max_degree < head_degree_cap(cfg.model.n_heads, devices)
    if lowered and cfg.train.max_doc_len > (capacity := cost.max_tokens(max_degree, devices)):
        raise ValueError(f"train.max_doc_len = {cfg.train.max_doc_len}: more than the largest SP group this placement "
                         f"allows (degree {max_degree} on {describe_nodes(nodes)}) can hold, {int(capacity):,} tokens; "
                         "lower it, or place the workers in whole power-of-two groups per node")
    router = GroupRouter(devices, max_degree, domains) if distributed else None
    train_seqs = DocumentSequences.from_rows(train_rows, cfg.train.max_doc_len)
    batches = DocumentBatches(train_seqs.lengths, cfg.train.tokens_per_step, cfg.train.seed)
    val_seqs = DocumentSequences.from_rows(val_rows, cfg.train.max_doc_len)
    return AdaptiveSequenceParallel(train_seqs, batches, val_seqs, cfg.train.val_batches, cost, devices, rank, router,
                                    max_degree=max_degree, node_of_rank=nodes, device=device, domains=domains)


def _build_pipeline(cfg, shard, mesh, device, train_rows, val_rows, dp_rank, dp_size, sp_rank, sp_size,
                    tokens) -> Trainee:
    """pp > 1: the schedule over this rank's materialised stages (`shard`, tensor-, sequence- and data-parallel
    as `build` made it), and the engine that steps them."""
    pp_group, tp = mesh["pp"].get_group(), mesh["tp"].size()
    tied = tied_group(mesh) if cfg.model.tie_embeddings else None
    micro_batch = (cfg.train.micro_batch_size, cfg.train.seq_len // sp_size)  # this rank's slice of each row
    # FSDP's mixed precision runs every block in the compute dtype, so what crosses a stage boundary is in it
    pipeline = Pipeline(shard, pp_group, cfg.parallel.pp_schedule, cfg.train.grad_accum, micro_batch, device, tp,
                        COMPUTE_DTYPES[cfg.train.dtype], tied)
    # the last stage's copy of a tied embedding is counted in the gradient norm on the first stage
    copies = ("tok_embeddings.weight",) if tied is not None and pipeline.has_last else ()
    engine = FSDPEngine(shard, build_optimizer(shard, cfg.optim), cfg.train.grad_clip, pp_group=pp_group,
                        norm_skips=copies)
    return Trainee(cfg, engine, train_rows, val_rows, device, dp_rank, dp_size, sp_rank=sp_rank, sp_size=sp_size,
                   pipeline=pipeline, token_group=tokens)


def run(cfg: TrainerConfig, reporter: Reporter, use_gpu: bool = False) -> TrainState:
    return train(build(cfg, use_gpu, from_pretrained=not reporter.has_checkpoint()), reporter)


def ray_train_loop(payload: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: the payload is the trainer sections of the validated config."""
    run(TrainerConfig.model_validate(payload["trainer"]), RayReporter(), use_gpu=payload["use_gpu"])
