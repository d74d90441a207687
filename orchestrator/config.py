"""The whole run config: the trainer's sections plus cluster and tracking, loaded from YAML with overrides.

`load_config(path, overrides)` returns a validated `Config` or raises `ConfigError`, whose message names
the key, the value and what is allowed. The trainer's sections refuse what the trainer cannot run
themselves (trainers.config); what needs the cluster (the degrees against cluster.num_workers) or the
driver's files (datasets, tokenizers, cost models) is checked here, so bad input stops before Ray starts.
"""

from __future__ import annotations

import typing
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from orchestrator.init_from import InitFromError, apply_init_from, check_dataset_tokenizer
from trainers.config import Section, TrainerConfig
from trainers.corpus import old_format_error, read_dataset_info
from trainers.parallel.mesh import checked_dims
from trainers.token_files import check_split, split_file
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
    log_models: typing.Literal["final", "every", "none"] = "final"
    """Models logged to MLflow (as MLflow 3 LoggedModels in the transformers flavor, linked to the run at their
    step; orchestrator.model_logging): 'final' the model at the run's last step, 'every' also each persisted
    checkpoint's, 'none' no model. A sweep logs only its best trial's final model, on its parent run."""
    sample_prompt: str | None = None
    """After the run: print what its final model writes after this prompt (64 new tokens, on the driver's CPU;
    `flotilla sample` for more) and log it to the MLflow run as sample.txt. None: no sample."""


class Config(TrainerConfig):
    """One Flotilla run: what to train (the trainer's sections), where, and how it is tracked."""

    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig | None = None
    """A sweep over this config (`flotilla sweep`); `flotilla train` ignores it."""

    def trainer_sections(self) -> dict[str, Any]:
        """The sections a worker needs, as plain data for Ray to ship."""
        return self.model_dump(include=set(TrainerConfig.model_fields))


def load_config(path: str | Path, overrides: list[str] = (), *, cost_model: bool = True) -> Config:
    """Read YAML, apply `key=value` overrides (values parsed as YAML), validate, check cross-section rules.
    `cost_model=False` leaves out the adaptive SP cost model's checks: for `flotilla profile`, which makes one."""
    data = _read_yaml(Path(path))
    for override in overrides:
        _apply_override(data, override)
    return validate_config(data, cost_model=cost_model)


def default_run_name(config_path: str | Path) -> str:
    """tracking.run_name when the config sets none: the config file's name and the time."""
    return f"{Path(config_path).stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def validate_config(data: dict[str, Any], *, cost_model: bool = True) -> Config:
    """A Config from plain data (a YAML file's sections), validated and checked, or ConfigError. With
    model.init_from, the model section comes from that directory's config.json first (orchestrator.init_from)."""
    try:
        data = apply_init_from(data)
    except InitFromError as err:
        raise ConfigError(str(err)) from None
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    check_config(config, cost_model=cost_model)
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


def check_config(config: Config, *, cost_model: bool = True) -> None:
    """What a validated Config still needs: the degrees on cluster.num_workers ranks and the files the driver
    can read (the trainer would fail on them only after Ray started), in the order a user would fix them.
    `cost_model=False` leaves out the adaptive SP cost model's checks (`flotilla profile` makes one)."""
    workers = config.cluster.num_workers
    try:
        checked_dims(config.parallel, workers)
    except ValueError as err:
        raise ConfigError(f"parallel: {err} (cluster.num_workers={workers})") from None
    _check_data(config)
    if config.parallel.sp_mode == "adaptive" and cost_model:
        _check_cost_model(config)
    if config.tune is not None and (problems := check_tune(config.tune, config)):
        raise ConfigError("\n".join(problems))


def _check_cost_model(config: Config) -> None:
    """parallel.sp_mode = adaptive: a cost model made for this model (or named, to simulate with it), that can
    hold train.max_doc_len in its largest group. Found only in the planning thread, a document too long for
    every group would stop the run at the step that holds it, and again at every restart."""
    from trainers.parallel.adaptive.cost import BUILTIN, GB, MB, format_shape, load_cost_model
    from trainers.parallel.adaptive.topology import max_group_degree

    settings, m, p = config.parallel.adaptive, config.model, config.parallel
    if settings.cost_model is None:  # trainers.config filled in a built-in made for this shape, if any
        made_for = "; ".join(f"{name}: {format_shape(make().model_shape)}" for name, make in BUILTIN.items())
        raise ConfigError(f"parallel.adaptive.cost_model is unset, and no built-in cost model was made for this "
                          f"model ({format_shape(m.shape)}; built-ins: {made_for}). Profile one on your devices: "
                          "`flotilla profile CONFIG --out cost.json`, then set parallel.adaptive.cost_model: cost.json; "
                          "or name a built-in (parallel.adaptive.cost_model: flexsp-7b) to simulate with its figures")
    try:
        cost = load_cost_model(settings.cost_model).with_token_cap(settings.max_tokens_per_device)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"parallel.adaptive.cost_model = {settings.cost_model!r}: {err}") from None
    if settings.cost_model not in BUILTIN and cost.model_shape and cost.model_shape != m.shape:
        raise ConfigError(f"parallel.adaptive.cost_model = {settings.cost_model!r} was profiled on another model "
                          f"({format_shape(cost.model_shape)}) than model ({format_shape(m.shape)}): its times and "
                          "memory are not this model's; profile this one (`flotilla profile CONFIG --out cost.json`)")
    degree = max_group_degree(p.sp, m.n_heads)
    capacity = cost.max_tokens(degree, p.sp)
    if config.train.max_doc_len > capacity:
        cap = settings.max_tokens_per_device
        capped = f", parallel.adaptive.max_tokens_per_device = {cap}" if cap is not None else ""
        raise ConfigError(f"train.max_doc_len = {config.train.max_doc_len}: more than the largest SP group (degree "
                          f"{degree} of parallel.sp = {p.sp}, model.n_heads = {m.n_heads}) can hold, {int(capacity):,} "
                          f"tokens by parallel.adaptive.cost_model = {settings.cost_model!r}{capped} "
                          f"({cost.model_state_bytes(p.sp) / GB:.2f} GiB of model states and "
                          f"{cost.activation_bytes_per_token / MB:.2f} MiB a token under its "
                          f"{cost.memory_cap_bytes / GB:.1f} GiB cap); lower train.max_doc_len to at most "
                          f"{int(capacity)} (longer documents are cut into chunks)")


def _check_data(config: Config) -> None:
    d = config.data
    if d.source == "parquet":
        if not (Path(d.path) / "meta.json").is_file():
            raise ConfigError(f"data.path = {d.path!r}: no dataset there (expected {Path(d.path) / 'meta.json'}); build one with `flotilla data`")
        if (old := old_format_error(d.path)) is not None:
            raise ConfigError(f"data.path = {d.path!r}: {old}")
        info = read_dataset_info(d.path)
        for split, docs in (("train", info.train_docs), ("val", info.val_docs)):
            try:  # a truncated or foreign split file fails here, not in every worker after Ray starts them
                check_split(split_file(d.path, split), docs)
            except ValueError as err:
                raise ConfigError(f"data.path = {d.path!r}: {err}") from None
        if config.model.init_from:  # before the vocabulary: another tokenizer is the cause, not the size
            try:
                check_dataset_tokenizer(config.model.init_from, info.tokenizer, d.path)
            except InitFromError as err:
                raise ConfigError(str(err)) from None
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
