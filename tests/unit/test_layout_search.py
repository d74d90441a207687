"""`flotilla plan --search`: every layout the config checks accept is listed, nothing else; ranked by the estimate;
filtered by memory; its JSON; the winner written as a config that loads back as that layout."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config, validate_config
from orchestrator.layout_search import (ENGINES, PP_SCHEDULES, Layout, candidate_layouts, degree_tuples, global_rows,
                                        search, search_json, write_winner)
from orchestrator.layout_trials import CPU_SECONDS, PEAK_MEMORY, MeasuringReporter, summarise
from orchestrator.plan import FP32, count_params, make_plan
from orchestrator.step_time import DeviceSpeed, estimate_step_time

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
FOUR = ["cluster.num_workers=4", "data.source=synthetic"]
# compute only: 1 GFLOP/s, links free and instant, no fixed cost a pass
COMPUTE_ONLY = DeviceSpeed(1e9, float("inf"), 0.0, 0.0, "test")
SPEED = DeviceSpeed(2e10, 1e9, 1e-3, 5e-3, "test")


@pytest.fixture(scope="module")
def tiny4():
    return load_config(TINY, FOUR)


@pytest.fixture(scope="module")
def found(tiny4):
    return search(tiny4, SPEED, float("inf"))


def key(layout: Layout) -> tuple:
    """What a layout runs as: sp_mode means nothing without sp, nor pp_schedule without pp."""
    return (layout.dp_replicate, layout.dp_shard, layout.pp, layout.tp, layout.sp,
            layout.sp_mode if layout.sp > 1 else None, layout.pp_schedule if layout.pp > 1 else None,
            layout.micro_batch_size, layout.grad_accum, layout.activation_checkpointing, layout.engine,
            layout.zero_stage)


def test_degree_tuples_multiply_to_the_world():
    assert degree_tuples(1) == [(1, 1, 1, 1, 1)]
    four = degree_tuples(4)
    assert len(four) == len(set(four)) == 15  # two factors of 2 over 5 axes: C(6, 2)
    assert all(math.prod(t) == 4 for t in four)
    assert len(degree_tuples(6)) == 25  # a 2 and a 3, each on any of the 5 axes
    assert len(degree_tuples(12)) == 15 * 5


def test_every_valid_layout_is_listed_and_nothing_else(tiny4, found):
    """Brute force over degrees 1..4 on each axis, every sp_mode and schedule, every micro-batch split of the global
    batch's 32 rows, activation checkpointing and engine, through validate_config: the same set as the search's."""
    assert global_rows(tiny4) == 8 * 4  # micro_batch_size 8 x grad_accum 1 x dp_shard 4
    data = tiny4.model_dump()
    valid = set()
    for degrees in itertools.product(range(1, 5), repeat=5):
        if math.prod(degrees) != 4:
            continue
        dp_replicate, dp_shard, pp, tp, sp = degrees
        for mode, schedule, mbs, ac, (engine, stage) in itertools.product(
                ("ulysses", "ring", "adaptive"), PP_SCHEDULES, range(1, 33), (False, True), ENGINES):
            accum, rest = divmod(32, mbs * dp_replicate * dp_shard)
            if rest or accum == 0:
                continue
            layout = Layout(dp_replicate, dp_shard, pp, tp, sp, mode, schedule, mbs, accum, ac, engine, stage)
            parallel = {k: v for k, v in layout.overrides().items() if k.startswith("parallel.")}
            try:
                validate_config({**data, "parallel": {**data["parallel"], **{k[9:]: v for k, v in parallel.items()}},
                                 "train": {**data["train"], "micro_batch_size": mbs, "grad_accum": accum}})
            except ConfigError:
                continue
            valid.add(key(layout))
    listed = [key(c.layout) for c in found.ranked + found.too_big]
    assert len(listed) == len(set(listed))  # no layout twice
    assert set(listed) == valid
    assert len(valid) > 100  # dp, tp=2, sp (both modes), pp (three schedules), ZeRO 1-3, micro-batch splits


def test_every_listed_layout_runs_as_listed_from_its_overrides(found):
    """A row's overrides on top of the config give that layout back (what `flotilla train -o ...` would run)."""
    for c in found.ranked[::7]:
        config = load_config(TINY, [*FOUR, *(f"{k}={v}" for k, v in c.layout.overrides().items())])
        assert make_plan(config).dims == c.plan.dims
        assert (config.train.micro_batch_size, config.train.grad_accum) == (c.layout.micro_batch_size,
                                                                           c.layout.grad_accum)


def test_refusals_are_counted_by_reason(tiny4, found):
    layouts, skipped = candidate_layouts(tiny4)
    assert not skipped  # 32 rows split over every dp of 4 workers
    assert len(found.ranked) + len(found.too_big) + found.refused_count == len(layouts)
    reasons = dict(found.refused)
    assert all(re.search(r"\b\d+\b", r) is None for r in reasons)  # numbers written as N
    assert reasons["parallel.tp = N: must divide model.n_kv_heads = N (each tensor-parallel rank holds whole heads)"] > 0


def test_a_global_batch_that_does_not_split_skips_those_degrees():
    config = load_config(TINY, ["cluster.num_workers=4", "data.source=synthetic", "parallel.dp_shard=2",
                                "parallel.tp=2", "train.micro_batch_size=3"])  # 3 x 1 x 2 = 6 rows
    layouts, skipped = candidate_layouts(config)
    assert global_rows(config) == 6
    assert sum(skipped.values()) == sum(1 for t in degree_tuples(4) if t[0] * t[1] == 4)  # dp = 4 does not divide 6
    assert all(6 % (lay.dp_replicate * lay.dp_shard) == 0 for lay in layouts)
    assert all(lay.micro_batch_size * lay.grad_accum * lay.dp_replicate * lay.dp_shard == 6 for lay in layouts)


def test_ranked_fastest_first_by_the_estimate(tiny4):
    found = search(tiny4, COMPUTE_ONLY, float("inf"))
    rates = [c.tokens_per_s for c in found.ranked]
    assert rates == sorted(rates, reverse=True)
    # compute only: the step's FLOPs over 4 devices; recomputing the forward costs a third more
    flops = make_plan(tiny4).flops_per_step
    plain = [c for c in found.ranked if c.layout.pp == 1 and not c.layout.activation_checkpointing]
    assert {round(c.step.total, 9) for c in plain} == {round(flops / 4 / 1e9, 9)}
    recomputed = [c for c in found.ranked if c.layout.pp == 1 and c.layout.activation_checkpointing]
    assert {round(c.step.total, 9) for c in recomputed} == {round(flops / 4 / 1e9 * 4 / 3, 9)}
    assert found.ranked[0].layout.pp == 1 and not found.ranked[0].layout.activation_checkpointing


def test_memory_filter(tiny4):
    everything = search(tiny4, SPEED, float("inf"))
    memories = sorted(c.memory for c in everything.ranked)
    limit = memories[len(memories) // 2]
    half = search(tiny4, SPEED, limit)
    assert half.ranked and half.too_big
    assert all(c.memory <= limit for c in half.ranked) and all(c.memory > limit for c in half.too_big)
    assert len(half.ranked) + len(half.too_big) == len(everything.ranked)
    assert {c.layout for c in half.ranked} == {c.layout for c in everything.ranked if c.memory <= limit}
    assert not search(tiny4, SPEED, 1.0).ranked


def test_step_time_by_hand(tiny4):
    """FSDP over dp_shard=4: two all-gathers of the float32 weights and a float32 reduce-scatter of the gradients,
    3/4 of each sent, unit by unit (4 blocks and the root); one micro-batch."""
    config = tiny4
    plan = make_plan(config)
    counts = count_params(config.model)
    step = estimate_step_time(config, plan.dims, counts, plan.flops_per_step, SPEED)
    assert step.communication_bytes == pytest.approx(3 * FP32 * counts.total * 3 / 4)
    assert step.collectives == 3 * 5 + 3 and step.passes == 5  # + the loop's token count, loss and norm
    assert step.compute == pytest.approx(plan.flops_per_step / 4 / 2e10)
    assert step.total == pytest.approx(step.compute + step.communication_bytes / 1e9 + 18e-3 + 5 * 5e-3)
    # a 2-stage 1F1B pipeline of 4 micro-batches idles (pp - 1) / m of its compute
    pp = load_config(TINY, [*FOUR, "parallel.pp=2", "parallel.dp_shard=2", "train.micro_batch_size=4",
                            "train.grad_accum=4"])
    pplan = make_plan(pp)
    piped = estimate_step_time(pp, pplan.dims, count_params(pp.model), pplan.flops_per_step, COMPUTE_ONLY)
    assert piped.bubble == pytest.approx(piped.compute / 4)


def test_search_json_shape(tmp_path, capsys):
    code = main(["plan", str(TINY), *(a for o in FOUR for a in ("-o", o)), "--search", "--json", "--device-flops",
                 "1e10", "--memory-gb", "0.1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world"] == 4 and report["global_rows"] == 32 and report["tokens_per_step"] == 32 * 256
    assert report["speed"]["flops"] == 1e10 and report["memory_limit_bytes"] == pytest.approx(0.1 * 2**30)
    first = report["ranked"][0]
    assert set(first) == {"rank", "label", "layout", "overrides", "memory_bytes", "memory", "step_time_s", "step",
                          "tokens_per_s"}
    assert set(first["step"]) == {"compute_s", "bubble_s", "communication_s", "overhead_s", "communication_bytes",
                                  "collectives", "passes"}
    assert [r["rank"] for r in report["ranked"]] == list(range(1, len(report["ranked"]) + 1))
    assert all(r["memory_bytes"] <= 0.1 * 2**30 for r in report["ranked"])
    assert all(r["memory_bytes"] > 0.1 * 2**30 and r["rank"] is None for r in report["too_big"])
    assert report["refused"]["count"] == sum(r["count"] for r in report["refused"]["reasons"]) > 0
    assert report["written"] is None


def test_search_table_and_errors(capsys):
    args = ["plan", str(TINY), *(a for o in FOUR for a in ("-o", o)), "--device-flops", "1e10"]
    assert main([*args, "--search", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "   1  " in out and "   4  " not in out and "more (--top 0" in out and "refused" in out
    assert main([*args, "--measure", "2"]) == 2  # --measure without --search
    assert main([*args, "--search", "--memory-gb", "0.000001"]) == 2  # nothing fits
    assert "fits a device" in capsys.readouterr().err


def test_winner_config_loads_back_as_that_layout(tiny4, found, tmp_path):
    best = next(c for c in found.ranked if c.layout.engine == "deepspeed" or c.layout.sp > 1)
    path = write_winner(tiny4, best.layout, tmp_path / "best.yaml", "a note\non two lines")
    assert path.read_text().startswith("# a note\n# on two lines\n")
    back = load_config(path)
    assert make_plan(back).dims == best.plan.dims
    for field, value in best.layout.overrides().items():
        section, name = field.split(".")
        assert getattr(getattr(back, section), name) == value
    untouched = {s: v for s, v in tiny4.model_dump().items() if s not in ("parallel", "train")}
    assert {s: v for s, v in back.model_dump().items() if s not in ("parallel", "train")} == untouched


def test_summarise_skips_the_warm_up():
    history = [{"step": 1, "step_time_s": 9.0, "tokens_per_s": 100.0, CPU_SECONDS: 20.0},
               {"step": 2, "step_time_s": 1.0, "tokens_per_s": 1000.0, PEAK_MEMORY: 0.5, CPU_SECONDS: 2.0},
               {"step": 3, "step_time_s": 2.0, "tokens_per_s": 500.0, CPU_SECONDS: 3.0},
               {"step": 4, "step_time_s": 1.0, "tokens_per_s": 1000.0, PEAK_MEMORY: 0.75, CPU_SECONDS: 5.0}]
    m = summarise(history, warmup=2)
    assert m.steps == 2 and m.tokens_per_s == pytest.approx(2000 / 3) and m.step_time_s == pytest.approx(1.5)
    assert m.peak_memory_gb == 0.75 and m.cpu_s == 4.0 and m.error is None
    assert summarise(history[:2], warmup=2).error


def test_measuring_reporter_adds_the_peak_to_the_last_step_and_cpu_time_to_each():
    class Inner:
        def __init__(self):
            self.reports = []

        def report(self, steps, checkpoint_dir=None):
            self.reports.append((steps, checkpoint_dir))

    inner = Inner()
    reporter = MeasuringReporter(inner, baseline_rss=0, use_gpu=False)
    sum(i * i for i in range(300_000))  # some CPU time
    reporter.report([{"step": 1}, {"step": 2}], "ckpt")
    (steps, checkpoint), = inner.reports
    assert checkpoint == "ckpt" and PEAK_MEMORY not in steps[0] and steps[1][PEAK_MEMORY] > 0.01  # this process's RSS
    assert steps[0][CPU_SECONDS] == steps[1][CPU_SECONDS] > 0


def test_device_speeds(tiny4):
    from orchestrator.step_time import CPU_EFFICIENCY, GPU_MFU, cpu_speed, device_speed

    shared = cpu_speed(tiny4, num_workers=4, cpus_per_worker=0.5, cores=2, thread_flops=1e10)
    assert shared.flops == pytest.approx(1e10 * CPU_EFFICIENCY * 0.5) and shared.idle_cost == 0.5
    alone = cpu_speed(tiny4, num_workers=2, cpus_per_worker=2, cores=8, thread_flops=1e10)
    assert alone.flops == pytest.approx(1e10 * CPU_EFFICIENCY * 2) and alone.idle_cost == 1.0
    assert device_speed(tiny4, device_flops=3e9).flops == 3e9
    gpu = validate_config({**tiny4.model_dump(), "cluster": {"num_workers": 4, "use_gpu": True},
                           "train": {**tiny4.train.model_dump(), "peak_flops": 1e15}})
    assert device_speed(gpu).flops == pytest.approx(1e15 * GPU_MFU[False])
    unknown = validate_config({**gpu.model_dump(), "train": {**gpu.train.model_dump(), "peak_flops": None}})
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.peak_flops"):
            device_speed(unknown)
