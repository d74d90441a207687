"""`flotilla plan --search`: every layout a config can run as on its cluster.num_workers devices, estimated and ranked.

A layout is the parallel degrees dp_replicate x dp_shard x pp x tp x sp (with sp_mode), the pipeline schedule, how
each data-parallel rank's share of the global batch splits into micro_batch_size x grad_accum, activation
checkpointing and the engine (fsdp, or deepspeed with ZeRO stage 1, 2 or 3). The global batch stays the config's:
its rows (micro_batch_size x grad_accum x dp) or, for document batching, train.tokens_per_step.

What is valid is what orchestrator.config.validate_config accepts: each candidate is the config's own data with the
layout's keys set, validated as `flotilla train` would validate it, so a combination the config checks come to allow
appears here with no change to this module. Each valid layout gets the plan's memory per device
(orchestrator.plan) and step time (orchestrator.step_time); those over the device's memory are dropped and the rest
ranked by estimated tokens a second. Pure but for validate_config's reads of the config's files; nothing is started
(orchestrator.layout_trials measures the best).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import Config, ConfigError, validate_config
from orchestrator.plan import MiB, Plan, make_plan
from orchestrator.step_time import DeviceSpeed, StepTime, device_speed, estimate_step_time
from trainers.parallel.mesh import ParallelDims

DEGREES = ("dp_replicate", "dp_shard", "pp", "tp", "sp")
SP_MODES = ("ulysses", "ring")
"""Tried for every sp > 1; 'adaptive' too where the config batches whole documents (its only use)."""
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
ENGINES = (("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3))
GiB = 2**30
REASON_WIDTH = 120
"""Characters of a refusal reason the table prints (the JSON has it whole)."""


@dataclass(frozen=True)
class Layout:
    """One way to run a config on its devices: the keys the search sets (parallel.*, train.*)."""

    dp_replicate: int
    dp_shard: int
    pp: int
    tp: int
    sp: int
    sp_mode: str
    pp_schedule: str
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: bool
    engine: str
    zero_stage: int

    def overrides(self) -> dict[str, Any]:
        """The layout as `-o` keys: {'parallel.tp': 2, 'train.grad_accum': 4, ...}."""
        values = asdict(self)
        train = {"micro_batch_size", "grad_accum"}
        return {f"{'train' if k in train else 'parallel'}.{k}": v for k, v in values.items()}

    def label(self) -> str:
        """Short, e.g. 'dp_shard=2 tp=2', 'sp=4 ring', 'pp=2 1f1b dp_shard=2'; 'single' for one device."""
        parts = []
        for axis in DEGREES:
            degree = getattr(self, axis)
            if degree > 1:
                parts.append(f"{axis}={degree}")
                if axis == "pp":
                    parts.append(self.pp_schedule)
                if axis == "sp":
                    parts.append(self.sp_mode)
        return " ".join(parts) or "single"

    def engine_label(self) -> str:
        return self.engine if self.engine == "fsdp" else f"zero{self.zero_stage}"


@dataclass(frozen=True)
class Candidate:
    """A valid layout with its estimates."""

    layout: Layout
    config: Config
    plan: Plan
    step: StepTime

    @property
    def memory(self) -> float:
        """Bytes a device holds at the peak (the plan's total)."""
        return self.plan.memory.total

    @property
    def tokens_per_s(self) -> float:
        return self.plan.tokens_per_step / self.step.total


@dataclass
class Search:
    """Every layout of one config on `world` devices: ranked, too big, or refused (and why)."""

    world: int
    tokens_per_step: int
    global_rows: int | None
    """micro_batch_size x grad_accum x dp that every layout keeps; None under document batching."""
    speed: DeviceSpeed
    memory_limit: float
    """Bytes one device may hold."""
    memory_source: str
    ranked: list[Candidate] = field(default_factory=list)
    """Those that fit, fastest first (estimated tokens a second)."""
    too_big: list[Candidate] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    """Why each candidate the config checks refused was refused (numbers written as N), and how many."""
    skipped: Counter = field(default_factory=Counter)
    """Degree combinations not tried, and why: the global batch does not split over their dp."""

    @property
    def refused_count(self) -> int:
        return sum(self.refused.values())


def degree_tuples(world: int) -> list[tuple[int, ...]]:
    """Every (dp_replicate, dp_shard, pp, tp, sp) of positive integers whose product is `world`."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    return [combo for combo in itertools.product(divisors, repeat=len(DEGREES)) if math.prod(combo) == world]


def global_rows(config: Config) -> int | None:
    """The config's global batch in rows (micro_batch_size x grad_accum x dp), or None under document batching,
    whose global batch is train.tokens_per_step."""
    if config.data.batching == "documents":
        return None
    dims = ParallelDims.from_config(config.parallel, config.cluster.num_workers)
    return config.train.micro_batch_size * config.train.grad_accum * dims.dp


def candidate_layouts(config: Config) -> tuple[list[Layout], Counter]:
    """Every layout to try for `config` on cluster.num_workers devices, and the degree combinations over which the
    global batch does not split (a reason -> how many; their layouts are not tried)."""
    world, rows = config.cluster.num_workers, global_rows(config)
    adaptive = ["adaptive"] if config.data.batching == "documents" else []
    unsplit: Counter = Counter()
    layouts = []
    for dp_replicate, dp_shard, pp, tp, sp in degree_tuples(world):
        modes = [*SP_MODES, *adaptive] if sp > 1 else (adaptive or ["ulysses"])
        schedules = PP_SCHEDULES if pp > 1 else (config.parallel.pp_schedule,)
        if rows is None:
            splits = [(config.train.micro_batch_size, config.train.grad_accum)]
        else:
            dp = dp_replicate * dp_shard
            if rows % dp:
                unsplit[f"the global batch of {rows} rows does not split over dp_replicate x dp_shard = {dp}"] += 1
                continue
            per_rank = rows // dp
            splits = [(per_rank // accum, accum) for accum in range(1, per_rank + 1) if per_rank % accum == 0]
        for mode, schedule, (mbs, accum), ac, (engine, stage) in itertools.product(
                modes, schedules, splits, (False, True), ENGINES):
            layouts.append(Layout(dp_replicate, dp_shard, pp, tp, sp, mode, schedule, mbs, accum, ac, engine, stage))
    return layouts, unsplit


def with_layout(data: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """A copy of a config's plain data with the layout's keys set (the sections it touches copied, the rest shared)."""
    out = dict(data)
    for key, value in layout.overrides().items():
        section, name = key.split(".")
        out[section] = {**out.get(section, {}), name: value}
    return out


def device_memory(config: Config, memory_gb: float | None = None) -> tuple[float, str]:
    """Bytes one worker may hold, and where the figure comes from: `memory_gb`; a GPU's memory (this machine's
    first GPU, taken as the workers'); a CPU worker's share of this machine's RAM (the embedded Ray puts every
    worker here). ConfigError for GPU workers planned on a machine without a GPU and no `memory_gb`."""
    if memory_gb:
        return memory_gb * GiB, "--memory-gb"
    workers = config.cluster.num_workers
    if config.cluster.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("cluster.use_gpu = true, and this machine has no GPU to read the workers' memory from: "
                              "give --memory-gb (one GPU's memory)")
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"this machine's {props.name}"
    import psutil

    total = psutil.virtual_memory().total
    return total / workers, f"this machine's {total / GiB:.1f} GiB of RAM over {workers} worker(s)"


def refusal_reason(err: ConfigError) -> str:
    """The first line of a refusal with its numbers written as N, so that refusals of one kind count together."""
    return re.sub(r"\b\d+(?:[.,]\d+)*\b", "N", str(err).splitlines()[0])  # 12, 1.5 and 12,345 alike


def search(config: Config, speed: DeviceSpeed, memory_limit: float, memory_source: str = "") -> Search:
    """Every layout of `config` (validated) on its cluster.num_workers devices: validated, estimated, and ranked."""
    data = config.model_dump()
    layouts, unsplit = candidate_layouts(config)
    base = make_plan(config)
    found = Search(config.cluster.num_workers, base.tokens_per_step, global_rows(config), speed, memory_limit,
                   memory_source, skipped=unsplit)
    for layout in layouts:
        try:
            candidate_config = validate_config(with_layout(data, layout))
        except ConfigError as err:
            found.refused[refusal_reason(err)] += 1
            continue
        plan = make_plan(candidate_config)
        step = estimate_step_time(candidate_config, plan.dims, plan.params, plan.flops_per_step, speed)
        candidate = Candidate(layout, candidate_config, plan, step)
        (found.ranked if candidate.memory <= memory_limit else found.too_big).append(candidate)
    found.ranked.sort(key=lambda c: (-c.tokens_per_s, c.memory, c.layout.label()))
    found.too_big.sort(key=lambda c: c.memory)
    return found


def search_config(config: Config, device_flops: float | None = None, link_gbps: float | None = None,
                  memory_gb: float | None = None) -> Search:
    """`search` at the speed of `config`'s devices (orchestrator.step_time.device_speed: `device_flops`, `link_gbps`
    where given) and their memory (`device_memory`); ConfigError where that speed cannot be known here, or where no
    layout fits a device."""
    try:
        speed = device_speed(config, device_flops, link_gbps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    found = search(config, speed, *device_memory(config, memory_gb))
    if not found.ranked:
        smallest = (f"; the smallest, {found.too_big[0].layout.label()}, needs {found.too_big[0].memory / MiB:,.1f} MiB"
                    if found.too_big else "")
        raise ConfigError(f"no layout on cluster.num_workers = {found.world} fits a device's "
                          f"{found.memory_limit / MiB:,.1f} MiB ({found.memory_source}){smallest}; "
                          f"{found.refused_count:,} refused by the config checks")
    return found


def format_search(found: Search, top: int | None = None, measured: dict[int, Any] | None = None) -> str:
    """The ranked table (the first `top` rows; all for None), the too-big and refused counts; with `measured`
    (rank -> orchestrator.layout_trials.Measured) the measured tokens/s and peak memory beside the estimates."""
    measured = measured or {}
    batch = (f"{found.global_rows} rows a step ({found.tokens_per_step:,} tokens)" if found.global_rows is not None
             else f"{found.tokens_per_step:,} tokens a step (train.tokens_per_step)")
    lines = [f"layouts on {found.world} device(s), global batch {batch}",
             f"speed: {found.speed.source}",
             f"memory: at most {found.memory_limit / GiB:.1f} GiB a device ({found.memory_source})"]
    header = f"{'#':>4}  {'layout':<32}{'mbs x ga':>9}  {'ac':<3}{'engine':<7}{'MiB':>9}{'step s':>9}{'tokens/s':>10}"
    if measured:
        header += f"  {'measured tokens/s':>17}{'peak MiB':>10}"
    lines.append(header)
    shown = found.ranked if top is None else found.ranked[:top]
    for rank, c in enumerate(shown, 1):
        lay = c.layout
        split = f"{lay.micro_batch_size} x {lay.grad_accum}" if found.global_rows is not None else "docs"
        row = (f"{rank:>4}  {lay.label():<32}{split:>9}  "
               f"{'ac' if lay.activation_checkpointing else '-':<3}{lay.engine_label():<7}{c.memory / MiB:>9,.1f}"
               f"{c.step.total:>9.3g}{c.tokens_per_s:>10,.0f}")
        if rank in measured:
            row += f"  {measured[rank].describe():>27}"
        lines.append(row)
    if len(shown) < len(found.ranked):
        lines.append(f"      ... {len(found.ranked) - len(shown)} more (--top 0 lists them all; --json too)")
    total = len(found.ranked) + len(found.too_big) + found.refused_count
    lines.append(f"{total:,} layouts tried: {len(found.ranked):,} fit, {len(found.too_big):,} valid but over the "
                 f"device's memory, {found.refused_count:,} refused")
    if found.too_big:
        small = found.too_big[0]
        lines.append(f"  smallest too big: {small.layout.label()} ({small.layout.micro_batch_size} x "
                     f"{small.layout.grad_accum}, {small.layout.engine_label()}), {small.memory / MiB:,.1f} MiB")
    if found.skipped:
        lines.append(f"{sum(found.skipped.values())} degree combination(s) not tried:")
        lines += [f"  {count:>6,} x {reason}" for reason, count in found.skipped.most_common()]
    if found.refused:
        lines.append(f"{found.refused_count:,} refused (reason x count; --json has them whole):")
        lines += [f"  {count:>6,} x {_shorten(reason)}" for reason, count in found.refused.most_common()]
    return "\n".join(lines)


def _shorten(text: str, width: int = REASON_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def candidate_json(c: Candidate, rank: int | None) -> dict[str, Any]:
    mem = c.plan.memory
    return {"rank": rank, "label": c.layout.label(), "layout": asdict(c.layout), "overrides": c.layout.overrides(),
            "memory_bytes": mem.total,
            "memory": {k: getattr(mem, k) for k in ("params", "grads", "accumulated", "optimizer", "gathered",
                                                   "activations")},
            "step_time_s": c.step.total,
            "step": {"compute_s": c.step.compute, "bubble_s": c.step.bubble, "communication_s": c.step.communication,
                     "overhead_s": c.step.overhead, "communication_bytes": c.step.communication_bytes,
                     "collectives": c.step.collectives, "passes": c.step.passes},
            "tokens_per_s": c.tokens_per_s}


def search_json(found: Search, measured: dict[int, Any] | None = None, written: Path | None = None) -> dict[str, Any]:
    """The search as plain data; `measured` (rank -> orchestrator.layout_trials.Measured) goes into those rows as
    "measured", `written` is the winner's config file."""
    ranked = [candidate_json(c, i) for i, c in enumerate(found.ranked, 1)]
    for rank, m in (measured or {}).items():
        ranked[rank - 1]["measured"] = asdict(m)
    return {"written": str(written) if written else None,"world": found.world, "global_rows": found.global_rows, "tokens_per_step": found.tokens_per_step,
            "speed": asdict(found.speed), "memory_limit_bytes": found.memory_limit,
            "memory_source": found.memory_source,
            "ranked": ranked,
            "too_big": [candidate_json(c, None) for c in found.too_big],
            "refused": {"count": found.refused_count,
                        "reasons": [{"reason": r, "count": n} for r, n in found.refused.most_common()]},
            "skipped": [{"reason": r, "count": n} for r, n in found.skipped.most_common()]}


def winner_data(config: Config, layout: Layout) -> dict[str, Any]:
    """`config` run as `layout`, as the plain data of a config file: the keys that differ from the defaults."""
    data = with_layout(config.model_dump(mode="json", exclude_defaults=True), layout)
    validate_config(data)  # what `flotilla train` will do with the file
    return data


def best(found: Search, measured: dict[int, Any]) -> tuple[int, Candidate, str]:
    """The winner: the fastest measured (rank -> Measured, those that ran), else the best estimate; its rank and how
    it won."""
    ran = {rank: m for rank, m in measured.items() if m.tokens_per_s is not None}
    if ran:
        rank = max(ran, key=lambda r: ran[r].tokens_per_s)
        return rank, found.ranked[rank - 1], f"measured {ran[rank].tokens_per_s:,.0f} tokens/s"
    return 1, found.ranked[0], f"estimated {found.ranked[0].tokens_per_s:,.0f} tokens/s"


def write_best(found: Search, measured: dict[int, Any], path: Path, command: str) -> str:
    """Write the winner (`best`) as a config file at `path`, headed by `command` and how it won; which it was."""
    rank, winner, how = best(found, measured)
    lay = winner.layout
    which = (f"#{rank} {lay.label()} (micro_batch_size {lay.micro_batch_size} x grad_accum {lay.grad_accum}, "
             f"{lay.engine_label()}{', activation checkpointing' if lay.activation_checkpointing else ''}), {how}")
    write_winner(winner.config, lay, path, f"{command}: {which}")
    return which


def write_winner(config: Config, layout: Layout, path: Path, note: str) -> Path:
    """Write `config` run as `layout` to `path` as YAML that `flotilla train` runs as it is; `note` heads it as a
    comment."""
    comment = "".join(f"# {line}\n" for line in note.splitlines())
    path.write_text(comment + yaml.safe_dump(winner_data(config, layout), sort_keys=False))
    return path
