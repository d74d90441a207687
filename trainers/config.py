"""The config sections a trainer reads: model, data, train, optim, parallel, checkpoint.

Each section is a typed, validated model; unknown keys are refused. `TrainerConfig` also refuses every
combination the trainer cannot run (head counts against tp and sp, pipeline stages, adaptive sequence
parallelism with document batching, ...), so a config that validates here is one `trainers.run` runs as
asked, whoever calls it. What depends on the world size is checked against the real one when the mesh is
built (trainers.parallel.mesh.checked_dims); the orchestrator composes these sections with its own (cluster,
tracking) and adds the checks that need the cluster or the driver's files (world size, dataset paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_STDLIB_CACHE = "data/cache"
"""Where source='stdlib' caches its dataset when data.path is not set."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, attribute docstrings document fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Section):
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention."""

    init_from: str | None = None
    """A local HuggingFace directory (config.json and safetensors, as save_pretrained writes them) to start
    from: its config.json sets the architecture keys (vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_dim,
    rope_theta, norm_eps, tie_embeddings; max_seq_len unless set), its weights replace the initialisation at
    step 0 (a resumed run continues from its own checkpoint), and its tokenizer.json, if any, is data.tokenizer's
    default. Never downloads."""

    vocab_size: int = Field(512, ge=2)
    """Number of token ids the embedding holds (at least the tokenizer's vocabulary)."""
    dim: int = Field(256, ge=8)
    """Hidden size; must be a multiple of n_heads."""
    n_layers: int = Field(4, ge=1)
    """Number of transformer blocks."""
    n_heads: int = Field(4, ge=1)
    """Query heads per attention layer."""
    n_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention); None means n_heads. Must divide n_heads."""
    ffn_dim: int | None = Field(None, ge=1)
    """Hidden size of the SwiGLU MLP; None means Llama's rule (8/3 * dim rounded up to 64)."""
    rope_theta: float = Field(10000.0, gt=0)
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    max_seq_len: int = Field(2048, ge=1)
    """Longest sequence the rotary tables cover."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    dropout_embed: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout after the token embedding."""
    dropout_attn: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention probabilities."""
    dropout_resid: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on each block's residual branch outputs."""
    attention: Literal["auto", "sdpa", "triton"] = "auto"
    """Attention implementation: 'auto' runs our Triton flash attention (kernels/) on CUDA tensors where
    kernels/verified.py lists it for the GPU (or FLOTILLA_KERNELS=triton asks for it), PyTorch's own kernels
    otherwise, on a CPU and with attention dropout; 'sdpa' always PyTorch's kernels (on CUDA SDPA flash for
    causal rows, varlen_attn or FlexAttention for packed documents: trainers.attention.choose_torch_attention;
    on a CPU SDPA with a document mask); 'triton' always the
    kernel's entry point, which runs Triton wherever the kernels layer does (FLOTILLA_KERNELS; interpreted on a
    CPU under TRITON_INTERPRET=1, for checks) and its per-document SDPA fallback elsewhere; no attention
    dropout."""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """RMSNorm, RoPE and SwiGLU: 'auto' runs our fused Triton kernels (kernels/) on CUDA tensors where
    kernels/verified.py lists them for the GPU (or FLOTILLA_KERNELS=triton asks for them), the PyTorch code
    otherwise; 'torch' always the PyTorch code; 'triton' the kernels wherever the kernels layer runs Triton
    (interpreted on a CPU, for checks). Tensor-parallel shards (DTensors) always take the PyTorch code."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def shape(self) -> dict[str, int]:
        """What a cost model of adaptive SP was measured on (CostModel.model_shape): a model of another shape
        runs at other speeds and memory."""
        return {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads, "kv_heads": self.kv_heads,
                "vocab_size": self.vocab_size}

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return 64 * -(-(8 * self.dim // 3) // 64)

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be a multiple of model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings")
        return self


class DataConfig(Section):
    """Where tokens come from and how documents are packed into rows."""

    source: Literal["synthetic", "parquet", "stdlib"] = "synthetic"
    """'synthetic' (seeded, learnable documents), 'parquet' (a dataset directory built by `flotilla data`; the
    name is older than its memory-mapped Arrow files), or 'stdlib' (the Python standard library's own source
    files, tokenised into a cached dataset)."""
    path: str | None = None
    """Dataset directory for source='parquet'; cache directory for source='stdlib' (default: data/cache)."""
    tokenizer: str = "byte"
    """'byte' (built-in byte-level tokenizer) or the path of a local HF tokenizer.json (source='stdlib')."""
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    """Share of files (stdlib) or documents (synthetic) held out for validation."""
    synthetic_docs: int = Field(2000, ge=2)
    """Number of synthetic documents (source='synthetic')."""
    synthetic_mean_len: int = Field(96, ge=1)
    """Mean document length in tokens (log-normal lengths, source='synthetic')."""
    train_tokens: int | None = Field(None, ge=2)
    """Train on only the first this many tokens of the training split (None: all of it). A data-limited
    run overfits within a short budget, which is where regularisation, and tuning it, matters."""
    batching: Literal["rows", "documents"] = "rows"
    """'rows': documents packed into fixed-length rows (train.seq_len, train.micro_batch_size); 'documents': a
    step's global batch is a set of whole documents within train.tokens_per_step, each longer than
    train.max_doc_len cut into chunks (trainers.documents), for adaptive sequence parallelism."""
    prefetch: int = Field(2, ge=0)
    """Steps whose batches are built ahead in a background thread, off the step's critical path (a queue this
    deep; data.batching = 'rows'); 0 builds each step's batches when it starts. A step reads the same rows
    either way."""

    @model_validator(mode="after")
    def _check_path(self) -> "DataConfig":
        if self.source == "parquet" and not self.path:
            raise ValueError("data.path: required when data.source = 'parquet' (a directory built by `flotilla data`)")
        return self


class TrainConfig(Section):
    """The training loop: steps, batch geometry, validation and logging cadence."""

    steps: int = Field(100, ge=1)
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    micro_batch_size: int = Field(8, ge=1)
    """Rows per forward pass on one data-parallel rank."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step. Global batch = micro_batch_size * grad_accum * dp."""
    seq_len: int = Field(256, ge=2)
    """Tokens per packed row."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    val_every: int = Field(50, ge=0)
    """Run validation every this many steps (and at the end); 0 disables it."""
    val_batches: int = Field(8, ge=1)
    """Micro-batches per validation pass on each rank."""
    log_every: int = Field(10, ge=1)
    """Send metrics to the driver every this many steps (each step's metrics are kept and sent). A report
    is a round trip through Ray Train's controller: about a second on a busy 2-core machine."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the forward and backward pass (parameters and optimizer state stay float32)."""
    tokens_per_step: int = Field(8192, ge=1)
    """data.batching = 'documents': the token budget of one step's global batch of whole documents."""
    max_doc_len: int = Field(2048, ge=1)
    """data.batching = 'documents': documents longer than this are cut into chunks of at most this many tokens."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s of one device, for MFU; None means known GPUs only (no MFU on CPU)."""


class OptimConfig(Section):
    """AdamW and its learning-rate schedule."""

    lr: float = Field(3e-4, gt=0.0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's beta1 and beta2."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam's epsilon."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay, applied to matrices only (not norms, not biases)."""
    implementation: Literal["auto", "torch", "triton"] = "auto"
    """'auto': our one-pass FusedAdamW (kernels/) for CUDA parameters under parallel.engine=fsdp where
    kernels/verified.py lists it for the GPU (or FLOTILLA_KERNELS=triton asks for it), torch's AdamW otherwise
    (fused on CUDA under the fsdp engine); 'torch' always torch's; 'triton' FusedAdamW, whose update runs Triton
    wherever the kernels layer does (interpreted on a CPU, for checks) and its PyTorch code elsewhere. DeepSpeed
    steps torch's AdamW unless 'triton' is asked for. Under the fsdp engine without pipeline stages FusedAdamW
    also does train.grad_clip's clipping, inside its step."""
    moments_dtype: Literal["float32", "bfloat16"] = "float32"
    """AdamW's exp_avg and exp_avg_sq: 'bfloat16' halves the optimizer state (8 -> 4 bytes a parameter), with
    stochastic rounding (kernels/adamw.py; within 3% of float32's update in its tests). Only FusedAdamW has it:
    'bfloat16' selects FusedAdamW under optim.implementation = auto, and needs parallel.engine = fsdp."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """'cosine': warmup then cosine decay; 'wsd': warmup, stable, then linear decay; 'constant': warmup then flat."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup from 0 to lr over this many steps."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Final learning rate as a fraction of lr (cosine and wsd)."""
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0)
    """Share of all steps spent in the final decay (wsd)."""

    @model_validator(mode="after")
    def _check_betas(self) -> "OptimConfig":
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"optim.betas[{i}]={b} must be in [0, 1)")
        return self

    @model_validator(mode="after")
    def _check_moments(self) -> "OptimConfig":
        if self.moments_dtype == "bfloat16" and self.implementation == "torch":
            raise ValueError("optim.moments_dtype = bfloat16 with optim.implementation = torch: torch's AdamW keeps "
                             "float32 moments; set optim.implementation to auto or triton (FusedAdamW), or "
                             "optim.moments_dtype = float32")
        return self


class AdaptiveSPConfig(Section):
    """Heterogeneity-adaptive sequence parallelism (parallel.sp_mode = 'adaptive'): the planner's inputs."""

    cost_model: str | None = None
    """The path of a JSON cost model profiled on the actual devices (`flotilla profile CONFIG --out cost.json`),
    or a built-in one by name ('flexsp-7b': FlexSP's published Llama-7B figures), which simulates with its
    figures whatever the model. None: the built-in made for a model of this shape, if there is one; a config
    without one is refused before anything starts."""
    max_tokens_per_device: int | None = Field(None, ge=1)
    """Cap the tokens one device holds per micro-batch, below what the cost model's memory cap allows."""


class ParallelConfig(Section):
    """How the world is split: one mesh with axes pp, dp_replicate, dp_shard, sp, tp."""

    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    """'fsdp' (FSDP2 with DDP-style replication) or 'deepspeed' (ZeRO over dp_shard x sp, with DeepSpeed's AutoTP
    for parallel.tp; no pp, no dp_replicate)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage (engine='deepspeed')."""
    dp_replicate: int = Field(1, ge=1)
    """Data-parallel replicas holding full copies of the parameters."""
    dp_shard: int = Field(-1, ge=-1)
    """Data-parallel ranks sharding parameters (FSDP); -1 fills what the other degrees leave of the world."""
    tp: int = Field(1, ge=1)
    """Tensor-parallel degree; must divide the head counts."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel degree."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule (pp > 1)."""
    sp: int = Field(1, ge=1)
    """Sequence-parallel degree."""
    sp_mode: Literal["ulysses", "ring", "adaptive"] = "ulysses"
    """Sequence parallelism: Ulysses all-to-all, ring attention, or heterogeneity-adaptive (FlexSP): every step
    the sp devices split into groups of mixed degrees from the batch's lengths (`flotilla plan --lengths`)."""
    adaptive: AdaptiveSPConfig = AdaptiveSPConfig()
    """sp_mode = 'adaptive': the cost model and caps the planner uses."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input for the backward pass and recompute the rest there: far
    less activation memory for about a third more compute."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory (engine fsdp, no pp): device
    memory holds only the gathered units and the activations; the optimizer steps on the CPU."""
    compile: bool = False
    """torch.compile each transformer block (engine fsdp; CPU runs need a C++ compiler)."""

    def resolved_dp_shard(self, world_size: int) -> int:
        """dp_shard with -1 filled in from the world size (may not divide: the caller checks)."""
        if self.dp_shard != -1:
            return self.dp_shard
        return max(1, world_size // (self.dp_replicate * self.tp * self.pp * self.sp))

    @property
    def pipeline_stages(self) -> int:
        """Stages the model is cut into: pp, or 2 * pp for interleaved 1F1B (two virtual stages per rank)."""
        return self.pp * stages_per_rank(self.pp_schedule)

    @model_validator(mode="after")
    def _check_engine(self) -> "ParallelConfig":
        if self.cpu_offload and (self.engine != "fsdp" or self.pp > 1):
            raise ValueError(f"parallel.cpu_offload = true with parallel.engine = {self.engine}, parallel.pp = {self.pp}: "
                             "offload runs with the fsdp engine without pipeline stages; set it to false")
        if self.compile and self.tp > 1:
            raise ValueError(f"parallel.compile = true with parallel.tp = {self.tp}: compiled tensor-parallel blocks "
                             "gave wrong input gradients in our tests (torch 2.13); set one of them to false/1")
        if self.engine == "fsdp":
            if self.zero_stage:
                raise ValueError(f"parallel.zero_stage = {self.zero_stage}: only parallel.engine=deepspeed reads it; set "
                                 "parallel.engine=deepspeed, or drop zero_stage (FSDP2 always shards over dp_shard)")
            return self
        if self.zero_stage == 0:
            raise ValueError("parallel.zero_stage = 0 with parallel.engine=deepspeed: choose ZeRO stage 1, 2 or 3 (stage "
                             "0 is plain data parallelism: parallel.engine=fsdp with parallel.dp_replicate does that)")
        if self.pp > 1:
            # DeepSpeed's PipelineEngine (deepspeed 0.19.8, runtime/pipe/engine.py) replaces the loop, not the model:
            # forward/backward/step raise "Only train_batch() is accessible in pipeline mode", train_batch() pulls
            # micro-batches from its own iterator through a PipelineModule (the model rebuilt as a list of layers
            # passing tensors only: our blocks also take cu_seqlens and the int max_seqlen), and runtime/engine.py
            # asserts "managed_gradient_accumulation=False is not supported with pipeline parallelism", which the
            # loop's global-token loss normalisation needs; PipelineEngine also asserts ZeRO stage < 2.
            raise ValueError(f"parallel.pp = {self.pp}: not supported with parallel.engine=deepspeed: DeepSpeed's "
                             "pipeline engine runs its own training loop (train_batch) over a model rebuilt as a "
                             "PipelineModule, with its own per-micro-batch loss averaging, and refuses ZeRO-2 and 3; "
                             "use parallel.engine=fsdp for pipeline parallelism, or set parallel.pp to 1")
        if self.dp_replicate != 1:
            raise ValueError(f"parallel.dp_replicate = {self.dp_replicate}: not supported with parallel.engine=deepspeed, "
                             "which runs ZeRO over its data-parallel ranks (parallel.dp_shard) as one data-parallel group; "
                             "set it to 1, or use parallel.engine=fsdp")
        if self.compile:
            raise ValueError("parallel.compile = true: not supported with parallel.engine=deepspeed (its ZeRO hooks "
                             "around our compiled blocks are untested here); set it to false, or use parallel.engine=fsdp")
        return self


def stages_per_rank(pp_schedule: str) -> int:
    """Pipeline stages each pp rank runs: interleaved 1F1B two (virtual stages), the other schedules one."""
    return 2 if pp_schedule == "interleaved_1f1b" else 1


class CheckpointConfig(Section):
    """Checkpoints for exact resume: model, optimizer, schedule, data position and RNG states."""

    every: int = Field(0, ge=0)
    """Save every this many steps (and at the end); 0 saves only at the end."""
    dir: str = "runs"
    """Root folder of runs: each run keeps its checkpoints under DIR/RUN_NAME."""
    keep: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep."""


class TrainerConfig(Section):
    """Everything one trainer process needs; the orchestrator's Config extends it with cluster and tracking."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _check_optimizer_engine(self) -> "TrainerConfig":
        # DeepSpeed partitions and checkpoints the optimizer state itself; FusedAdamW's bf16 moments under it
        # have never been run (its tests cover float32 moments as DeepSpeed's client optimizer)
        if self.optim.moments_dtype == "bfloat16" and self.parallel.engine == "deepspeed":
            raise ValueError("optim.moments_dtype = bfloat16 with parallel.engine = deepspeed: not supported "
                             "(bf16 moments are FusedAdamW's, tested under the fsdp engine only); set "
                             "optim.moments_dtype = float32, or parallel.engine = fsdp")
        return self

    @model_validator(mode="after")
    def _check_layout(self) -> "TrainerConfig":
        """What the layout needs of the model, the rows and the data, in the order a user would fix it."""
        p, m, t = self.parallel, self.model, self.train
        for heads_key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
            if heads % p.tp:
                raise ValueError(f"parallel.tp = {p.tp}: must divide {heads_key} = {heads} (each tensor-parallel rank "
                                 "holds whole heads)")
        if p.tp > 1 and t.seq_len % p.tp:
            raise ValueError(f"parallel.tp = {p.tp}: must divide train.seq_len = {t.seq_len} (between blocks each "
                             "tensor-parallel rank holds an equal slice of the sequence)")
        if m.hidden_dim % p.tp:
            raise ValueError(f"parallel.tp = {p.tp}: must divide the MLP hidden size {m.hidden_dim} (model.ffn_dim, or "
                             "8/3 * model.dim rounded up to 64 when unset): each rank holds an equal slice")
        if t.seq_len > m.max_seq_len:
            raise ValueError(f"train.seq_len = {t.seq_len}: must be at most model.max_seq_len = {m.max_seq_len}")
        if self.data.train_tokens is not None and self.data.train_tokens < t.seq_len + 1:
            raise ValueError(f"data.train_tokens = {self.data.train_tokens}: fewer than one row of train.seq_len = "
                             f"{t.seq_len} needs ({t.seq_len + 1}); raise it or lower train.seq_len")
        if p.sp_mode == "adaptive":
            self._check_adaptive()
        elif p.sp > 1:
            self._check_sequence_parallel()
        if p.pp > 1:
            self._check_pipeline()
        if self.data.batching == "documents":
            if p.sp_mode != "adaptive":
                raise ValueError("data.batching = documents: its steps of whole documents run through adaptive sequence "
                                 "parallelism; set parallel.sp_mode = adaptive (with parallel.sp = cluster.num_workers)")
            if t.max_doc_len > m.max_seq_len:
                raise ValueError(f"train.max_doc_len = {t.max_doc_len}: must be at most model.max_seq_len = "
                                 f"{m.max_seq_len} (the rotary tables cover that many positions)")
        return self

    def _check_pipeline(self) -> None:
        """pp > 1, with any of dp_replicate, dp_shard, tp and sp (ulysses or ring; adaptive is refused by its own
        check) inside each stage, and tied embeddings (a copy on the first and the last stage, kept in sync:
        trainers.parallel.pipeline). What tp and sp need of the model and rows their own checks say."""
        p, m, accum = self.parallel, self.model, self.train.grad_accum
        if m.n_layers % p.pipeline_stages:
            raise ValueError(f"model.n_layers = {m.n_layers}: must split evenly into the {p.pipeline_stages} pipeline "
                             f"stages (parallel.pp = {p.pp}, parallel.pp_schedule = {p.pp_schedule})")
        if accum % p.pp:
            raise ValueError(f"train.grad_accum = {accum}: must be a multiple of parallel.pp = {p.pp} (the step's "
                             "micro-batches are the pipeline's; fewer would leave stages idle, and the schedules need it)")

    def _check_adaptive(self) -> None:
        """sp_mode = adaptive: parallel.dp_replicate SP domains of parallel.sp devices (one domain of every device
        by default), each splitting into groups of mixed degrees (the data-parallel units), Ulysses inside each
        group; FSDP shards the model within a domain and replicates it over the domains (HSDP). The SP domain may
        exceed the heads, the planner then caps the groups' degree (trainers.parallel.adaptive.topology
        .max_group_degree). That dp_replicate x sp is the whole world is checked against the world
        (trainers.parallel.mesh.checked_dims); what needs the cost model (its file, its model's shape, the longest
        document a domain can hold) by orchestrator.config.check_config. An unset cost model becomes the built-in
        made for this model's shape, where there is one."""
        from trainers.parallel.adaptive.cost import builtins_for  # the package imports this module

        p, m = self.parallel, self.model
        if self.data.batching != "documents":
            raise ValueError(f"parallel.sp_mode = 'adaptive' plans whole documents: set data.batching = documents "
                             f"(it is {self.data.batching!r})")
        why = {"parallel.tp": "Ulysses in each group already splits the heads, and the planner's cost model has no "
                              "tensor-parallel term",
               "parallel.pp": "pipeline schedules need micro-batches of one shape and count on every stage, the "
                              "planner's vary per step",
               "parallel.dp_shard": "a domain already shards the model over its devices, and the documents are split "
                                    "between domains by the planner; for more data parallelism raise "
                                    "parallel.dp_replicate (more domains)"}
        others = {key: value for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp)) if value != 1}
        if p.dp_shard not in (1, -1):  # -1 (the default) fills the world: checked_dims says whether that leaves 1
            others["parallel.dp_shard"] = p.dp_shard
        if others:
            key, value = next(iter(others.items()))
            raise ValueError(f"{key} = {value} with parallel.sp_mode = 'adaptive': not supported ({why[key]}); set it "
                             "to 1: adaptive SP spans every device with parallel.dp_replicate SP domains of "
                             "parallel.sp devices each")
        if p.engine != "fsdp":
            raise ValueError(f"parallel.engine = {p.engine} with parallel.sp_mode = 'adaptive': not supported (the "
                             "executor reduces gradients through FSDP2's hooks); set parallel.engine = fsdp")
        if p.adaptive.cost_model is None and (made_for := builtins_for(m.shape)):
            p.adaptive = p.adaptive.model_copy(update={"cost_model": made_for[0]})

    def _check_sequence_parallel(self) -> None:
        p, m, seq_len = self.parallel, self.model, self.train.seq_len
        if p.sp_mode == "ring" and m.dropout_attn:
            raise ValueError(f"model.dropout_attn = {m.dropout_attn}: parallel.sp_mode = 'ring' has no attention "
                             "dropout; set it to 0 or use parallel.sp_mode = 'ulysses'")
        if p.sp_mode == "ulysses" and (m.n_heads // p.tp) % p.sp:
            raise ValueError(f"parallel.sp = {p.sp}: must divide the {m.n_heads // p.tp} query heads of each "
                             f"tensor-parallel rank (model.n_heads = {m.n_heads} / parallel.tp = {p.tp}): Ulysses gives "
                             "each sequence-parallel rank whole heads of the full sequence")
        if seq_len % (p.sp * p.tp):
            raise ValueError(f"parallel.sp = {p.sp}: sp x tp = {p.sp * p.tp} must divide train.seq_len = {seq_len} "
                             "(each sequence-parallel rank holds an equal slice of every row, which tensor parallelism "
                             "slices again between blocks)")


AnyTrainerConfig = TypeVar("AnyTrainerConfig", bound=TrainerConfig)


def absolute_paths(config: AnyTrainerConfig) -> AnyTrainerConfig:
    """A copy of `config` (a TrainerConfig, or the orchestrator's Config) with every path in it made absolute
    against this process's working directory, for processes that run elsewhere (Ray Train workers, Tune
    trials): model.init_from, data.path (the stdlib cache by default), data.tokenizer unless 'byte',
    parallel.adaptive.cost_model unless unset or a built-in name, checkpoint.dir. The one place that knows which
    keys are paths."""
    from trainers.parallel.adaptive.cost import BUILTIN

    def absolute(path: str) -> str:
        return str(Path(path).resolve())

    data = config.data
    path = data.path or (DEFAULT_STDLIB_CACHE if data.source == "stdlib" else None)
    data = data.model_copy(update={"path": path and absolute(path),
                                   "tokenizer": data.tokenizer if data.tokenizer == "byte" else absolute(data.tokenizer)})
    adaptive = config.parallel.adaptive
    if adaptive.cost_model is not None and adaptive.cost_model not in BUILTIN:
        adaptive = adaptive.model_copy(update={"cost_model": absolute(adaptive.cost_model)})
    parallel = config.parallel.model_copy(update={"adaptive": adaptive})
    checkpoint = config.checkpoint.model_copy(update={"dir": absolute(config.checkpoint.dir)})
    init_from = config.model.init_from
    model = config.model.model_copy(update={"init_from": init_from and absolute(init_from)})
    return config.model_copy(update={"model": model, "data": data, "parallel": parallel, "checkpoint": checkpoint})
