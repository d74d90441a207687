"""`flotilla plan --search --measure K`: the K best-estimated layouts trained for a few steps each, as the trials
of one Ray Tune run whose objective is throughput.

Each trial is a real trainer started the way `flotilla train` starts one (orchestrator.launch.run_training, tracked
in MLflow, tagged flotilla.layout_search), one trial at a time so that no two share the CPUs or the links they are
timed on. A trial's workers run `measuring_worker`: the ordinary worker loop, whose reports also carry the peak
memory of the busiest rank. Its result is what the trainer measured after the warm-up steps:
- tokens_per_s: the global batch's tokens over the summed `step_time_s` (trainers.metrics: the time of the step's
  forward, backward and optimizer step on rank 0, without reporting or validation);
- peak_memory_gb: on a GPU torch.cuda.max_memory_allocated; on a CPU the peak RSS (getrusage's ru_maxrss) less the
  RSS the worker had when its training function started (Python, torch, Ray and the process group already loaded):
  what training added. Either is the largest over the ranks.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError, validate_config
from trainers.config import absolute_paths

WARMUP_STEPS = 2
"""Steps of a trial not timed: the first step's allocations and first-call dispatch, the prefetch thread starting."""
PEAK_MEMORY = "peak_memory_gb"
"""Metric added to each report by `measuring_worker`: the largest peak memory of any rank so far, in GiB."""
CPU_SECONDS = "cpu_s"
"""Metric added to each step by `measuring_worker`: CPU seconds all ranks spent on it together (their process time:
what the step costs the machine's cores, whatever else runs there)."""
GiB = 2**30


@dataclass(frozen=True)
class Measured:
    """What one trial measured (or why it has nothing)."""

    tokens_per_s: float | None = None
    step_time_s: float | None = None
    peak_memory_gb: float | None = None
    steps: int = 0
    """Steps timed (after the warm-up)."""
    cpu_s: float | None = None
    """CPU seconds of all ranks together a timed step (CPU_SECONDS)."""
    error: str | None = None

    def describe(self) -> str:
        if self.error:
            return f"failed: {self.error[:60]}"
        peak = f"{self.peak_memory_gb * 1024:>10,.1f}" if self.peak_memory_gb is not None else f"{'-':>10}"
        return f"{self.tokens_per_s:>17,.0f}{peak}"


def summarise(history: list[dict[str, Any]], warmup: int) -> Measured:
    """The throughput of the steps after the first `warmup` (allocator growth, first-call dispatch, the prefetch
    thread starting), and the largest peak memory reported."""
    timed = [h for h in history if h.get("step", 0) > warmup and "step_time_s" in h]
    peaks = [h[PEAK_MEMORY] for h in history if PEAK_MEMORY in h]
    if not timed:
        return Measured(error=f"no step after the {warmup} warm-up step(s) reported a time")
    seconds = sum(h["step_time_s"] for h in timed)
    tokens = sum(h["tokens_per_s"] * h["step_time_s"] for h in timed)
    cpu = [h[CPU_SECONDS] for h in timed if CPU_SECONDS in h]
    return Measured(tokens / seconds, seconds / len(timed), max(peaks) if peaks else None, len(timed),
                    sum(cpu) / len(cpu) if cpu else None)


def trial_config(config: Config, steps: int, out_dir: Path) -> Config:
    """`config` cut to a measuring run: `steps` steps each reported (each step's CPU time is told apart), no
    validation, no model logged, no sample, no system metrics, its checkpoints under `out_dir`."""
    data = config.model_dump()
    data["train"] = {**data["train"], "steps": steps, "val_every": 0, "log_every": 1}
    data["checkpoint"] = {**data["checkpoint"], "every": 0, "dir": str(out_dir)}
    data["tracking"] = {**data["tracking"], "log_models": "none", "sample_prompt": None, "run_name": None,
                        "system_metrics": False}  # its sampling thread would take CPU from the steps being timed
    return absolute_paths(validate_config(data))


class MeasuringReporter:
    """A Reporter that adds to each report, over all ranks (a collective, as every report is): PEAK_MEMORY, the
    largest peak so far, to its last step; CPU_SECONDS, the CPU time the ranks spent together since the previous
    report, shared evenly among its steps, to every step."""

    def __init__(self, inner, baseline_rss: int, use_gpu: bool):
        self.inner, self.baseline_rss, self.use_gpu = inner, baseline_rss, use_gpu
        self.cpu_mark = time.process_time()

    def has_checkpoint(self) -> bool:
        return self.inner.has_checkpoint()

    def latest_checkpoint(self):
        return self.inner.latest_checkpoint()

    def report(self, steps: list[dict[str, Any]], checkpoint_dir=None) -> None:
        import resource

        import torch
        import torch.distributed as dist

        cpu, self.cpu_mark = time.process_time() - self.cpu_mark, time.process_time()
        device = "cuda" if self.use_gpu else "cpu"
        peak = (torch.cuda.max_memory_allocated() if self.use_gpu
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline_rss)
        peak, cpu = torch.tensor(float(peak), device=device), torch.tensor(cpu, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
        per_step = cpu.item() / len(steps)
        steps = [{**s, CPU_SECONDS: per_step} for s in steps]
        steps[-1][PEAK_MEMORY] = peak.item() / GiB
        self.inner.report(steps, checkpoint_dir)


def measuring_worker(payload: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker` for a measuring trial: trainers.run.run with a MeasuringReporter."""
    import psutil

    baseline = psutil.Process().memory_info().rss  # before the trainer builds anything
    from trainers.config import TrainerConfig
    from trainers.reporter import RayReporter
    from trainers.run import run

    use_gpu = payload["use_gpu"]
    run(TrainerConfig.model_validate(payload["trainer"]), MeasuringReporter(RayReporter(), baseline, use_gpu), use_gpu)


def _trial(params: dict[str, Any], *, configs: list[Config], names: list[str], launch: Callable, tracking_uri: str,
           warmup: int, search: str) -> None:
    """The Tune trainable (a driver function): train one layout, report what it measured."""
    from ray import tune

    from tune.sweep import REPORT_POLL_ENV, REPORT_POLL_S

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # Tune runs this in another process and directory
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    i = params["layout"]
    outcome = launch(configs[i], run_name=names[i], worker_loop=measuring_worker, log_models=False,
                     tags={"flotilla.layout_search": search})
    measured = summarise(outcome.history, warmup)
    if measured.error:
        raise RuntimeError(measured.error)
    nan = float("nan")
    tune.report({"tokens_per_s": measured.tokens_per_s, "step_time_s": measured.step_time_s,
                 PEAK_MEMORY: nan if measured.peak_memory_gb is None else measured.peak_memory_gb,
                 CPU_SECONDS: nan if measured.cpu_s is None else measured.cpu_s, "steps_timed": measured.steps})


def measure_top(found, k: int, name: str, *, steps: int, address: str | None = None,
                quiet: bool = True) -> dict[int, Measured]:
    """The best `k` of a search (orchestrator.layout_search.Search) measured as the Ray Tune run `name`, on an
    embedded Ray or the cluster at `address`, their checkpoints under checkpoint.dir/name: rank -> Measured."""
    from orchestrator.launch import run_training
    from orchestrator.ray_connect import connect_ray

    top = found.ranked[:k]
    config = top[0].config
    results = measure([c.config for c in top], name=name, out_dir=Path(config.checkpoint.dir) / name,
                      launch=functools.partial(run_training, address=address, quiet=quiet),
                      connect=lambda: connect_ray(address, quiet=quiet), steps=steps, warmup=WARMUP_STEPS)
    return dict(enumerate(results, 1))


def measure(configs: list[Config], *, name: str, launch: Callable, connect: Callable[[], None], out_dir: Path,
            steps: int, warmup: int) -> list[Measured]:
    """Train each of `configs` for `steps` steps as one trial of a Ray Tune run named `name` (one trial at a time,
    in order); what each measured after `warmup` steps, or its error. `launch` is run_training, `connect` starts
    or attaches Ray."""
    import ray
    from ray import tune

    from orchestrator.mlflow_client import tracking_uri
    from tune.sweep import DRIVER_RESOURCES

    out_dir = out_dir.resolve()
    runs = [trial_config(c, steps, out_dir) for c in configs]
    names = [f"{name}-{i + 1}" for i in range(len(configs))]
    connect()
    need = configs[0].cluster.num_workers * configs[0].cluster.cpus_per_worker
    if (have := ray.cluster_resources().get("CPU", 0)) < need:
        raise ConfigError(f"cluster.cpus_per_worker = {configs[0].cluster.cpus_per_worker:g}: a trial needs {need:g} CPUs "
                          f"(cluster.num_workers x cluster.cpus_per_worker), the Ray cluster has {have:g}; lower it")
    options = {"configs": runs, "names": names, "launch": launch, "tracking_uri": tracking_uri(), "warmup": warmup,
               "search": name}

    def trainable(config):  # Tune wants a function of `config` alone
        return _trial(config, **options)

    tuner = tune.Tuner(
        tune.with_resources(trainable, DRIVER_RESOURCES),
        param_space={"layout": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(metric="tokens_per_s", mode="max", max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(out_dir / "tune"), verbose=0),
    )
    started = time.monotonic()
    grid = tuner.fit()
    results: list[Measured] = [Measured(error="not run")] * len(configs)
    for result in grid:
        i = result.config["layout"]
        if result.error is not None:
            results[i] = Measured(error=str(result.error).strip().splitlines()[-1])
            continue
        m = result.metrics
        peak, cpu = (None if m.get(key) is None or math.isnan(m[key]) else m[key] for key in (PEAK_MEMORY, CPU_SECONDS))
        results[i] = Measured(m["tokens_per_s"], m["step_time_s"], peak, int(m["steps_timed"]), cpu)
    print(f"flotilla: measured {len(configs)} layout(s) in {time.monotonic() - started:.0f} s", file=sys.stderr,
          flush=True)
    return results
