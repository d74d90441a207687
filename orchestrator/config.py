"""The whole run config: the trainer's sections plus cluster and tracking, loaded from YAML with overrides.

`load_config(path, overrides)` returns a validated `Config` or raises `ConfigError`, whose message names
the key, the value and what is allowed. Rules that span sections (world size, head counts, dataset paths)
are checked here too, so bad input stops before Ray starts.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from trainers.config import ParallelConfig, Section, TrainerConfig
from trainers.corpus import old_format_error, read_dataset_info
from trainers.parallel.mesh import ParallelDims, stages_per_rank
from trainers.tokenizer import load_tokenizer
from tune.config import TuneConfig, check_tune


class ConfigError(ValueError):
    """A config that cannot run; the message is for people."""


class ClusterConfig(Section):
    """Ray resources for one run."""

    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one process each); the parallel degrees must multiply to this."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); otherwise CPU workers on gloo."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each worker."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts from the latest checkpoint before the run fails; -1 retries forever."""
    resources: dict[str, float] = {}
    """Further Ray resources each worker needs, e.g. {node_a: 1} for a custom resource a node was started
    with (`ray start --resources`), or {"accelerator_type:H100": 0.001}. One worker's whole request must fit
    on one node; a run no node can hold fails before it starts, naming the resource."""

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in ("CPU", "GPU"):
                key = "cluster.cpus_per_worker" if name == "CPU" else "cluster.use_gpu"
                raise ValueError(f"{name} = {amount}: set {key} instead (resources holds the others)")
            if not amount > 0:
                raise ValueError(f"{name} = {amount}: must be a positive amount (fractions below 1 share a unit)")
        return resources


class TrackingConfig(Section):
    """MLflow. The tracking URI follows MLflow: MLFLOW_TRACKING_URI if set, else its default store in the
    working directory."""

    experiment: str = "flotilla"
    """MLflow experiment the run goes to."""
    run_name: str | None = None
    """Name of the run, its checkpoints and its MLflow run. A run whose name already has checkpoints
    continues from the latest one. None: a fresh name from the config file and the time."""
    system_metrics: bool = True
    """Log CPU, memory, disk, network (and GPU) utilisation as MLflow system metrics."""
    system_metrics_interval: float = Field(5.0, gt=0)
    """Seconds between system-metric samples."""


class Config(TrainerConfig):
    """One Flotilla run: what to train (the trainer's sections), where, and how it is tracked."""

    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig | None = None
    """A sweep over this config (`flotilla sweep`); `flotilla train` ignores it."""

    def trainer_sections(self) -> dict[str, Any]:
        """The sections a worker needs, as plain data for Ray to ship."""
        return self.model_dump(include=set(TrainerConfig.model_fields))


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `key=value` overrides (values parsed as YAML), validate, check cross-section rules."""
    data = _read_yaml(Path(path))
    for override in overrides:
        _apply_override(data, override)
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    check_config(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...), got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(f"override {override!r} is malformed: write -o section.key=value, e.g. -o train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a path with a colon): keep the text
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key; {_allowed_keys(e['loc'][:-1])}")
        elif e["type"] == "value_error":
            lines.append(str(e["ctx"]["error"]) if not key else f"{key}: {e['ctx']['error']}")
        else:
            lines.append(f"{key} = {e['input']!r}: {e['msg'].replace('Input should be', 'must be')}")
    return "\n".join(lines[:5])


def _section_type(annotation: Any) -> type[Section] | None:
    """The Section class of a field annotated `Section` or `Section | None`, else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _allowed_keys(loc: tuple) -> str:
    model: type[Section] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        section = _section_type(field.annotation) if field else None
        if section is None:
            break
        model = section
    where = ".".join(str(p) for p in loc) or "the top level"
    return f"{where} accepts: {', '.join(model.model_fields)}"


def check_config(config: Config) -> None:
    """Rules spanning sections, in the order a user would fix them."""
    p, m = config.parallel, config.model
    dims = ParallelDims.from_config(p, config.cluster.num_workers)
    try:
        dims.validate()
    except ValueError as err:
        raise ConfigError(f"parallel: {err} (cluster.num_workers={config.cluster.num_workers})") from None
    _check_engine(p)
    for heads_key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
        if heads % p.tp:
            raise ConfigError(f"parallel.tp = {p.tp}: must divide {heads_key} = {heads} (each tensor-parallel rank holds whole heads)")
    if p.tp > 1 and config.train.seq_len % p.tp:
        raise ConfigError(f"parallel.tp = {p.tp}: must divide train.seq_len = {config.train.seq_len} "
                          "(between blocks each tensor-parallel rank holds an equal slice of the sequence)")
    if m.hidden_dim % p.tp:
        raise ConfigError(f"parallel.tp = {p.tp}: must divide the MLP hidden size {m.hidden_dim} (model.ffn_dim, "
                          "or 8/3 * model.dim rounded up to 64 when unset): each rank holds an equal slice")
    if config.train.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len = {config.train.seq_len}: must be at most model.max_seq_len = {m.max_seq_len}")
    _check_data(config)
    if p.pp > 1:
        _check_pipeline(config)
    if p.sp_mode == "adaptive":
        _check_adaptive(config)
    elif p.sp > 1:
        _check_sequence_parallel(config)
    if config.data.batching == "documents" and p.sp_mode != "adaptive":
        raise ConfigError("data.batching = documents: its steps of whole documents run through adaptive sequence "
                          "parallelism; set parallel.sp_mode = adaptive (with parallel.sp = cluster.num_workers)")
    if config.data.batching == "documents" and config.train.max_doc_len > m.max_seq_len:
        raise ConfigError(f"train.max_doc_len = {config.train.max_doc_len}: must be at most model.max_seq_len = "
                          f"{m.max_seq_len} (the rotary tables cover that many positions)")
    if config.tune is not None and (problems := check_tune(config.tune, config)):
        raise ConfigError("\n".join(problems))


def _check_pipeline(config: Config) -> None:
    p, m, accum = config.parallel, config.model, config.train.grad_accum
    others = {k: v for k, v in (("parallel.tp", p.tp), ("parallel.sp", p.sp)) if v > 1}
    if others:
        key, value = next(iter(others.items()))
        raise ConfigError(f"{key} = {value} with parallel.pp = {p.pp}: not supported together yet; pipeline "
                          f"parallelism runs with data parallelism only (parallel.dp_shard, parallel.dp_replicate)")
    if m.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings = true with parallel.pp = {p.pp}: the embedding (first stage) and "
                          "the output projection (last stage) live on different ranks; set it to false")
    stages = p.pp * stages_per_rank(p.pp_schedule)
    if m.n_layers % stages:
        raise ConfigError(f"model.n_layers = {m.n_layers}: must split evenly into the {stages} pipeline stages "
                          f"(parallel.pp = {p.pp}, parallel.pp_schedule = {p.pp_schedule})")
    if accum % p.pp:
        raise ConfigError(f"train.grad_accum = {accum}: must be a multiple of parallel.pp = {p.pp} (the step's "
                          "micro-batches are the pipeline's; fewer would leave stages idle, and the schedules need it)")


def _check_adaptive(config: Config) -> None:
    """sp_mode = adaptive: the SP domain is every device (the groups it splits into are the data-parallel
    units), Ulysses inside each group, so the largest group degree must divide the heads."""
    from trainers.parallel.adaptive.cost import degrees_up_to, load_cost_model

    p, m = config.parallel, config.model
    if config.data.batching != "documents":
        raise ConfigError(f"parallel.sp_mode = 'adaptive' plans whole documents: set data.batching = documents "
                          f"(it is {config.data.batching!r})")
    others = {k: v for k, v in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.dp_replicate", p.dp_replicate),
                                ("parallel.dp_shard", p.resolved_dp_shard(config.cluster.num_workers))) if v != 1}
    if others or p.engine != "fsdp":
        key, value = next(iter(others.items())) if others else ("parallel.engine", p.engine)
        raise ConfigError(f"{key} = {value} with parallel.sp_mode = 'adaptive': the adaptive SP domain spans every "
                          "device (parallel.sp = cluster.num_workers, the other degrees 1, parallel.engine = fsdp)")
    largest = degrees_up_to(p.sp)[-1]
    if m.n_heads % largest:
        raise ConfigError(f"parallel.sp = {p.sp}: its largest group degree {largest} must divide model.n_heads = "
                          f"{m.n_heads} (Ulysses gives each rank of a group whole heads)")
    try:
        load_cost_model(p.adaptive.cost_model)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"parallel.adaptive.cost_model = {p.adaptive.cost_model!r}: {err}") from None


def _check_sequence_parallel(config: Config) -> None:
    p, m = config.parallel, config.model
    if p.sp_mode == "ring" and m.dropout_attn:
        raise ConfigError(f"model.dropout_attn = {m.dropout_attn}: parallel.sp_mode = 'ring' has no attention dropout; "
                          "set it to 0 or use parallel.sp_mode = 'ulysses'")
    if p.sp_mode == "ulysses" and (m.n_heads // p.tp) % p.sp:
        raise ConfigError(f"parallel.sp = {p.sp}: must divide the {m.n_heads // p.tp} query heads of each tensor-parallel "
                          f"rank (model.n_heads = {m.n_heads} / parallel.tp = {p.tp}): Ulysses gives each "
                          "sequence-parallel rank whole heads of the full sequence")
    if config.train.seq_len % (p.sp * p.tp):
        raise ConfigError(f"parallel.sp = {p.sp}: sp x tp = {p.sp * p.tp} must divide train.seq_len = "
                          f"{config.train.seq_len} (each sequence-parallel rank holds an equal slice of every row, "
                          "which tensor parallelism slices again between blocks)")


def _check_engine(p: ParallelConfig) -> None:
    if p.cpu_offload and (p.engine != "fsdp" or p.pp > 1):
        raise ConfigError(f"parallel.cpu_offload = true with parallel.engine = {p.engine}, parallel.pp = {p.pp}: "
                          "offload runs with the fsdp engine without pipeline stages; set it to false")
    if p.compile and p.tp > 1:
        raise ConfigError(f"parallel.compile = true with parallel.tp = {p.tp}: compiled tensor-parallel blocks gave "
                          "wrong input gradients in our tests (torch 2.13); set one of them to false/1")
    if p.engine == "fsdp":
        if p.zero_stage:
            raise ConfigError(f"parallel.zero_stage = {p.zero_stage}: only parallel.engine=deepspeed reads it; "
                              "set parallel.engine=deepspeed, or drop zero_stage (FSDP2 always shards over dp_shard)")
        return
    if p.zero_stage == 0:
        raise ConfigError("parallel.zero_stage = 0 with parallel.engine=deepspeed: choose ZeRO stage 1, 2 or 3 "
                          "(stage 0 is plain data parallelism: parallel.engine=fsdp with parallel.dp_replicate does that)")
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.dp_replicate", p.dp_replicate)):
        if value != 1:
            raise ConfigError(f"{key} = {value}: not supported with parallel.engine=deepspeed, which runs ZeRO over "
                              "every rank as one data-parallel group; set it to 1, or use parallel.engine=fsdp")
    if p.compile:
        raise ConfigError("parallel.compile = true: not supported with parallel.engine=deepspeed (its ZeRO hooks "
                          "around our compiled blocks are untested here); set it to false, or use parallel.engine=fsdp")


def _check_data(config: Config) -> None:
    d = config.data
    if d.train_tokens is not None and d.train_tokens < config.train.seq_len + 1:  # the worker would refuse it
        raise ConfigError(f"data.train_tokens = {d.train_tokens}: fewer than one row of train.seq_len = "
                          f"{config.train.seq_len} needs ({config.train.seq_len + 1}); raise it or lower train.seq_len")
    if d.source == "parquet":
        if not d.path:
            raise ConfigError("data.path: required when data.source = 'parquet' (a directory built by `flotilla data`)")
        if not (Path(d.path) / "meta.json").is_file():
            raise ConfigError(f"data.path = {d.path!r}: no dataset there (expected {Path(d.path) / 'meta.json'}); build one with `flotilla data`")
        if (old := old_format_error(d.path)) is not None:
            raise ConfigError(f"data.path = {d.path!r}: {old}")
        info = read_dataset_info(d.path)
        if info.vocab_size > config.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {config.model.vocab_size}: smaller than the {info.tokenizer} "
                              f"tokenizer's {info.vocab_size} tokens the dataset {d.path!r} was built with; raise it")
        return
    if d.source == "stdlib":
        try:
            tokenizer = load_tokenizer(d.tokenizer)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.tokenizer = {d.tokenizer!r}: {err}") from None
        if tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {config.model.vocab_size}: smaller than the {tokenizer.name} tokenizer's {tokenizer.vocab_size} tokens"
            )
