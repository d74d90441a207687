"""`flotilla plan --search`'s estimates against measured runs: step time and memory per device, layout by layout.

    python bench/layout_estimates.py              # configs/tiny.yaml on 4 CPU workers (half a core each), the
                                                  # layouts of CASES, 8 steps each (2 warm-up): about 8 minutes
    python bench/layout_estimates.py --from bench/results/layout_estimates.json
                                                  # no runs: the saved measurements against the current model

Each case is a layout the search lists for the config (orchestrator.layout_search), measured the way
`flotilla plan --search --measure K` measures its best K (orchestrator.layout_trials: one Ray Tune run, one trial at
a time, each a real trainer through orchestrator.launch.run_training): the step time is the mean `step_time_s` of
the timed steps, the memory the largest peak over the ranks (on a CPU: peak RSS less the RSS the worker had when its
training function started). The estimates are orchestrator.step_time's at the CPU speed measured at the start of the
run (one thread's matmul rate, which the machine's other load moves), and the plan's memory total.

The fit: the step-time model is linear in 1 / flops, 1 / link bandwidth, latency and the fixed cost a unit pass, so
non-negative least squares over the measured cases (on relative errors) gives the constants that explain them best.
Before the runs it calibrates in isolation: one worker's step on one thread in this process (CPU time), and gloo's
all-gather between two processes. The table goes to
bench/results/layout_estimates.md (and .json) with the machine, versions and load averages.
"""

from __future__ import annotations

# run as `python bench/x.py`, sys.path[0] is bench/, where kernels.py would shadow the kernels package
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny.yaml"
OVERRIDES = ["cluster.num_workers=4", "cluster.cpus_per_worker=0.5", "data.source=synthetic"]
CASES = {
    "dp_shard=4": {},
    "dp_shard=4, 2 x 4 micro-batches": {"micro_batch_size": 2, "grad_accum": 4},
    "dp_shard=4, activation checkpointing": {"activation_checkpointing": True},
    "dp_replicate=4": {"dp_replicate": 4, "dp_shard": 1},
    "dp_shard=2 tp=2": {"dp_shard": 2, "tp": 2, "micro_batch_size": 16},
    "sp=4 ulysses": {"dp_shard": 1, "sp": 4, "micro_batch_size": 32},
    "dp_shard=2 sp=2 ring": {"dp_shard": 2, "sp": 2, "sp_mode": "ring", "micro_batch_size": 16},
    "pp=2 1f1b dp_shard=2": {"dp_shard": 2, "pp": 2, "pp_schedule": "1f1b", "grad_accum": 2},
    "deepspeed ZeRO-2": {"engine": "deepspeed", "zero_stage": 2},
    "deepspeed ZeRO-3": {"engine": "deepspeed", "zero_stage": 3},
}
"""Each case: the keys that differ from the default layout (dp_shard=4, micro-batch 8 x 1, fsdp, ulysses, 1f1b)."""
DEFAULT = {"dp_replicate": 1, "dp_shard": 4, "pp": 1, "tp": 1, "sp": 1, "sp_mode": "ulysses", "pp_schedule": "1f1b",
           "micro_batch_size": 8, "grad_accum": 1, "activation_checkpointing": False, "engine": "fsdp", "zero_stage": 0}
STEPS, WARMUP = 8, 2
CALIBRATION_STEPS, CALIBRATION_ROWS = 4, (1, 2, 4, 8)
MiB = 2**20


def load_base():
    from orchestrator.config import load_config

    return load_config(CONFIG, OVERRIDES)


def cases(config) -> dict:
    """Each case's Candidate from the search's list (a case the config checks refuse is left out, with a line)."""
    from orchestrator.layout_search import Layout, search
    from orchestrator.step_time import DeviceSpeed

    unit = DeviceSpeed(1.0, 1.0, 0.0, 0.0, "unit")  # speed does not matter here: only the candidates are used
    found = search(config, unit, float("inf"))
    by_layout = {c.layout: c for c in found.ranked}
    picked = {}
    for name, keys in CASES.items():
        layout = Layout(**{**DEFAULT, **keys})
        if layout in by_layout:
            picked[name] = by_layout[layout]
        else:
            print(f"{name}: not a valid layout of {CONFIG.name} here; left out", flush=True)
    return picked


def measure_cases(picked: dict, work: Path) -> dict:
    from orchestrator.launch import run_training
    from orchestrator.layout_trials import measure
    from orchestrator.ray_connect import connect_ray

    names = list(picked)
    results = measure([picked[n].config for n in names], name="layout-estimates", launch=run_training,
                      connect=lambda: connect_ray(None, quiet=True), out_dir=work, steps=STEPS, warmup=WARMUP)
    return {n: {"step_time_s": r.step_time_s, "tokens_per_s": r.tokens_per_s, "cpu_s": r.cpu_s, "peak_memory_bytes":
                None if r.peak_memory_gb is None else r.peak_memory_gb * 2**30, "error": r.error}
            for n, r in zip(names, results)}


def busy_step(measured: dict, record: dict, config) -> float | None:
    """A step's CPU seconds over all ranks, over the cores they run on: its time on a machine with nothing else
    running, where the workers outnumber the cores (an idle worker's core runs another)."""
    if not measured.get("cpu_s"):
        return None
    threads = max(1, int(config.cluster.cpus_per_worker))
    return measured["cpu_s"] / min(record["cores"], config.cluster.num_workers * threads)


def calibrate_compute(config) -> dict:
    """One worker's step on one thread, in this process (trainers.run.build without a process group, the loop's own
    train_step), at micro-batches of 1, 2, 4 and 8 rows; a least-squares line t(rows) = rows x seq_len x
    flops_per_token / F + units x pass (units: the blocks and the root) gives F (FLOP/s), its share of the thread's
    matmul rate, and the fixed seconds of a unit pass."""
    import numpy as np
    import torch

    from orchestrator.config import validate_config
    from orchestrator.step_time import measure_thread_flops
    from trainers.loop import BatchPlan, train_step
    from trainers.model import flops_per_token
    from trainers.run import build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {}
    try:
        for rows in CALIBRATION_ROWS:
            data = config.model_dump()
            data["train"] = {**data["train"], "micro_batch_size": rows, "grad_accum": 1}
            data["parallel"] = {**data["parallel"], "dp_shard": 1}
            data["cluster"] = {**data["cluster"], "num_workers": 1}
            cfg = validate_config(data)
            trainee = build(cfg)
            plan = BatchPlan(len(trainee.train_rows), rows, 1, 0, 1, cfg.train.seed)
            for step in range(2):  # warm-up
                train_step(trainee, plan, step)
            started = time.process_time()  # CPU time: the machine's other load does not count
            for step in range(2, 2 + CALIBRATION_STEPS):
                train_step(trainee, plan, step)
            times[rows] = (time.process_time() - started) / CALIBRATION_STEPS
        thread = measure_thread_flops(8 * config.train.seq_len, config.model.dim, config.model.hidden_dim, seconds=1.0)
    finally:
        torch.set_num_threads(threads)
    per_row = config.train.seq_len * flops_per_token(config.model, config.train.seq_len)
    slope, intercept = np.polyfit(list(times), list(times.values()), 1)
    flops = per_row / slope
    return {"step_s_by_rows": times, "flops": flops, "thread_flops": thread, "efficiency": flops / thread,
            "pass_s": intercept / (config.model.n_layers + 1)}


def _gloo_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result = {}
    for elements, calls in ((256, 200), (2**20, 20)):  # 1 KiB and 4 MiB a rank
        shard = torch.ones(elements)
        full = torch.empty(elements * world)
        for _ in range(3):
            dist.all_gather_into_tensor(full, shard)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(calls):
            dist.all_gather_into_tensor(full, shard)
        result[elements * 4] = (time.perf_counter() - started) / calls
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def calibrate_gloo(world: int = 2) -> dict:
    """gloo's all-gather among `world` single-thread processes on this machine (one per core: the constants are at a
    whole core), at 1 KiB and 4 MiB a rank: t = latency + sent / bandwidth, sent = (world - 1) / world of the
    gathered tensor, as orchestrator.step_time counts it."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        mp.spawn(_gloo_rank, args=(world, f"file://{tmp}/init", str(out)), nprocs=world)
        times = {int(k): v for k, v in json.loads(out.read_text()).items()}
    (small, t_small), (large, t_large) = sorted(times.items())
    bandwidth = (large - small) * (world - 1) / (t_large - t_small)
    return {"world": world, "small_s": t_small, "large_s": t_large, "link_bytes_per_s": bandwidth,
            "latency_s": t_small - small * (world - 1) / bandwidth}


def speed_at(record: dict, config):
    from orchestrator.step_time import cpu_speed

    return cpu_speed(config, config.cluster.num_workers, config.cluster.cpus_per_worker, cores=record["cores"],
                     thread_flops=record["thread_flops"])


def estimates(picked: dict, record: dict, config) -> dict:
    from orchestrator.step_time import DeviceSpeed, estimate_step_time

    speed = speed_at(record, config)
    unit = DeviceSpeed(1.0, 1.0, 0.0, 0.0, "unit", idle_cost=speed.idle_cost)
    out = {}
    for name, c in picked.items():
        step = estimate_step_time(c.config, c.plan.dims, c.plan.params, c.plan.flops_per_step, speed)
        flops = estimate_step_time(c.config, c.plan.dims, c.plan.params, c.plan.flops_per_step, unit)
        out[name] = {"step_time_s": step.total, "compute_s": step.compute + step.bubble,
                     "communication_s": step.communication, "overhead_s": step.overhead,
                     "memory_bytes": c.memory,
                     # the model's terms at unit speed, for the fit: FLOPs (with the bubble), bytes, calls, passes
                     "terms": [flops.compute + flops.bubble, step.communication_bytes, step.collectives, step.passes]}
    return out


def fit(est: dict, target: dict, share: float) -> dict | None:
    """Non-negative least squares on relative errors: target ~ F / flops + B / link + C x latency + P x pass, over a
    worker's `share` of a core; the constants returned are at a whole core, as orchestrator.step_time writes them."""
    import numpy as np

    names = [n for n in est if target.get(n)]
    if len(names) < 4:
        return None
    terms = np.array([est[n]["terms"] for n in names], dtype=float)
    y = np.array([target[n] for n in names])
    (inv_flops, inv_link, latency, pass_s) = coef = _nnls(terms / y[:, None], np.ones(len(y)))
    predicted = terms @ coef
    return {"flops_per_core": 1 / (inv_flops * share) if inv_flops else float("inf"),
            "link_bytes_per_s": 1 / (inv_link * share) if inv_link else float("inf"), "latency_s": latency * share,
            "pass_s": pass_s * share, "ratios": {n: p / m for n, p, m in zip(names, predicted, y)}}


def environment() -> str:
    import ray
    import torch

    cpu = platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return (f"{os.cpu_count()} cores of {cpu} (CPU only), Python {platform.python_version()}, torch "
            f"{torch.__version__}, Ray {ray.__version__}, Flotilla {rev.stdout.strip() or '?'} with uncommitted changes")


def _nnls(a, b):
    """Non-negative least squares by trying every subset of the columns (4 here): the best fit whose coefficients are
    all non-negative. (scipy 1.17's nnls aborted with a double free on these inputs.)"""
    import itertools

    import numpy as np

    best, best_residual = np.zeros(a.shape[1]), float(np.sum(b**2))
    for k in range(1, a.shape[1] + 1):
        for columns in itertools.combinations(range(a.shape[1]), k):
            coef, *_ = np.linalg.lstsq(a[:, columns], b, rcond=None)
            if (coef < 0).any():
                continue
            residual = float(np.sum((a[:, columns] @ coef - b) ** 2))
            if residual < best_residual:
                best, best_residual = np.zeros(a.shape[1]), residual
                best[list(columns)] = coef
    return best


def _memory_gap(est: dict, measured: dict) -> str:
    gaps = {n: m["peak_memory_bytes"] - est[n]["memory_bytes"] for n, m in measured.items()
            if m.get("peak_memory_bytes") and n in est}
    if not gaps:
        return ""
    ds = [g for n, g in gaps.items() if "deepspeed" in n]
    rest = [g for n, g in gaps.items() if "deepspeed" not in n]
    text = f": here {min(rest) / MiB:.0f} to {max(rest) / MiB:.0f} MiB more than the plan under fsdp" if rest else ""
    return text + (f", {min(ds) / MiB:.0f} to {max(ds) / MiB:.0f} MiB under deepspeed" if ds else "")


def _ratio_line(name: str, est: dict, target: dict) -> str:
    import numpy as np

    ok = [n for n in est if target.get(n)]
    ratios = [est[n]["step_time_s"] / target[n] for n in ok]
    if not ratios:
        return f"{name}: nothing measured."
    fastest_est = min(ok, key=lambda n: est[n]["step_time_s"])
    order = sorted(ok, key=lambda n: target[n])
    return (f"{name}: estimate / measured from {min(ratios):.2f} to {max(ratios):.2f} (geometric mean error "
            f"x{np.exp(np.mean(np.abs(np.log(ratios)))):.2f}); fastest measured {order[0]}, estimated {fastest_est}; "
            f"measured order: {', '.join(order)}.")


def report(record: dict, est: dict, picked: dict, config) -> str:
    from orchestrator.step_time import CPU_EFFICIENCY, CPU_PASS_S, GLOO_BYTES_PER_S, GLOO_LATENCY_S

    measured, calibration = record["measured"], record["calibration"]
    wall = {n: m.get("step_time_s") for n, m in measured.items()}
    busy = {n: busy_step(m, record, config) for n, m in measured.items()}
    share = min(1.0, record["cores"] / config.cluster.num_workers)
    fits = {what: fit(est, target, share) for what, target in (("wall", wall), ("CPU", busy))}
    speed = speed_at(record, config)
    compute, gloo = calibration["compute"], calibration["gloo"]
    lines = [
        "# Layout search: estimated against measured step time and memory",
        "",
        f"Measured {record['date']} on {record['environment']}. Produced by `{record['command']}` (its docstring has "
        "the setup); the table by `python bench/layout_estimates.py --from bench/results/layout_estimates.json` with "
        "the constants of orchestrator/step_time.py as they are now.",
        "",
        f"Config: configs/tiny.yaml {' '.join('-o ' + o for o in OVERRIDES)} (0.87M parameters, global batch 32 rows "
        f"x 256 tokens); {STEPS} steps a layout, the first {WARMUP} not timed; one trial at a time. Load average "
        f"(1 min) {record['load_before']:.2f} before the runs, {record['load_after']:.2f} after ({record['wall_s']:.0f}"
        " s): the machine is shared with other engineers' work, which slows the measured (wall) step times by "
        "whatever it takes of the 2 cores. The CPU column is load-proof: a step's CPU seconds over all 4 workers "
        "(their process time, orchestrator.layout_trials) divided by the 2 cores they share: the step time the "
        "machine would give them alone.",
        "",
        f"Speed assumed: {speed.source}.",
        "",
        "| layout | estimate (s): compute / comm. / overhead = total | measured wall (s) | est. / wall "
        "| measured CPU-s / cores (s) | est. / CPU | est. memory (MiB) | measured peak (MiB) | est. / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in est.items():
        m = measured.get(name, {})
        parts = (f"{e['compute_s']:.3f} / {e['communication_s']:.3f} / {e['overhead_s']:.3f} = "
                 f"{e['step_time_s']:.3f}")
        if m.get("error") or not m.get("step_time_s"):
            lines.append(f"| {name} | {parts} | failed: {m.get('error', 'not run')} | | | | | | |")
            continue
        peak, cpu = m["peak_memory_bytes"], busy[name]
        cpu_cells = f"{cpu:.3f} | {e['step_time_s'] / cpu:.2f}" if cpu else "- | -"
        lines.append(f"| {name} | {parts} | {m['step_time_s']:.3f} | {e['step_time_s'] / m['step_time_s']:.2f} "
                     f"| {cpu_cells} | {e['memory_bytes'] / MiB:.1f} | {peak / MiB:.1f} | {e['memory_bytes'] / peak:.2f} |")
    lines += ["", _ratio_line("Wall", est, wall), "", _ratio_line("CPU", est, busy), ""]
    ok = [n for n in est if busy.get(n)]
    if ok:  # what `flotilla plan` said before orchestrator.step_time: FLOPs / (world x peak), peak unknown on a CPU
        bound = {n: picked[n].plan.flops_per_step / config.cluster.num_workers / record["thread_flops"] for n in ok}
        ratios = [bound[n] / busy[n] for n in ok]
        lines += [f"Before: `flotilla plan` gave no step time here (train.peak_flops is unset on a CPU), and its "
                  f"model, the step's FLOPs over world x peak, with this machine's thread matmul rate as the peak, "
                  f"says {min(bound.values()):.3f} s for every layout: {min(ratios):.2f} to "
                  f"{max(ratios):.2f} of the CPU-measured times, blind to the workers sharing 2 cores, to what the "
                  "model sustains below the matmul rate, and to every layout's communication and overhead.", ""]
    lines += [
        f"Calibration, before the runs: one worker's step on one thread, in-process (CPU time, micro-batches of "
        f"{', '.join(map(str, CALIBRATION_ROWS))} rows): {compute['flops'] / 1e9:.1f} GFLOP/s, "
        f"{compute['efficiency']:.0%} of the thread's matmul rate ({compute['thread_flops'] / 1e9:.1f} GFLOP/s), "
        f"{compute['pass_s'] * 1e3:.2f} ms a unit pass; gloo all-gather between {gloo['world']} processes: "
        f"{gloo['link_bytes_per_s'] / 1e9:.2f} GB/s, {gloo['latency_s'] * 1e3:.2f} ms a call.",
        "",
        "Least-squares fits of the constants (at a whole core) to these runs:",
    ]
    for what, f in fits.items():
        if f is None:
            lines.append(f"- to the {what} times: too few measured")
            continue
        lines.append(f"- to the {what} times: {f['flops_per_core'] / record['thread_flops']:.0%} of the thread's "
                     f"matmul rate, link {f['link_bytes_per_s'] / 1e9:.2g} GB/s, {f['latency_s'] * 1e3:.2f} ms a call, "
                     f"{f['pass_s'] * 1e3:.2f} ms a unit pass; fitted / measured: "
                     + ", ".join(f"{n} {r:.2f}" for n, r in f["ratios"].items()))
    lines += ["", f"orchestrator/step_time.py has: CPU_EFFICIENCY {CPU_EFFICIENCY}, GLOO_BYTES_PER_S "
                  f"{GLOO_BYTES_PER_S:.2g}, GLOO_LATENCY_S {GLOO_LATENCY_S:.2g}, CPU_PASS_S {CPU_PASS_S:.2g}.",
              "",
              "Memory: on a CPU the measured peak is the growth of the busiest worker's resident set while it trains "
              "(getrusage's peak less the RSS when its training function started): the plan's states and "
              "activations plus what the plan leaves out (the data, allocator slack, the collectives' buffers, "
              "DeepSpeed's own buffers)" + _memory_gap(est, measured) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", type=Path, help="a saved .json: re-estimate its measurements, run nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "layout_estimates.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = load_base()
    picked = cases(config)
    if args.source:
        record = json.loads(args.source.read_text())
    else:
        from orchestrator import console

        console.quiet()  # Flotilla's lines and errors only, as the CLI prints them; before Ray is imported
        work = Path(tempfile.mkdtemp(prefix="layout-estimates-"))
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        load_before = os.getloadavg()[0]
        calibration = {"compute": calibrate_compute(config), "gloo": calibrate_gloo()}
        thread_flops = calibration["compute"]["thread_flops"]  # what the search measures (cpu_speed), for 1 s
        print(f"calibration: {json.dumps(calibration)}", flush=True)
        began = time.monotonic()
        measured = measure_cases(picked, work)
        record = {"date": datetime.date.today().isoformat(), "environment": environment(),
                  "command": "python bench/layout_estimates.py", "thread_flops": thread_flops, "cores": os.cpu_count(),
                  "load_before": load_before, "load_after": os.getloadavg()[0], "wall_s": time.monotonic() - began,
                  "calibration": calibration, "measured": measured}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    est = estimates(picked, record, config)
    text = report(record, est, picked, config)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
