"""Sweep overhead: configs/pbt-tiny.yaml three ways, side by side in one run on the same task and budget.

    python bench/sweep_overhead.py --seeds 0 1 2         # all three at seed 0, then persistent and ray-tune at
                                                        # seeds 1 and 2: about 25 minutes on a 2-core CPU machine
    python bench/sweep_overhead.py --methods persistent segments
    python bench/sweep_overhead.py --report             # rebuild the table from bench/results/sweep_overhead.json

- persistent: `flotilla sweep configs/pbt-tiny.yaml` (tune.reuse_workers, the default where every trial fits at
  once): one trainer per trial for the whole sweep, exploits loaded in place.
- segments:   the same with `-o tune.reuse_workers=false`: a new Ray Train trainer per trial per segment.
- ray-tune:   Ray Tune's own `PopulationBasedTraining` over a function trainable, as Ray's guide for Ray Train
  under Ray Tune (Train V2) has it: the trainable launches the same TorchTrainer through Flotilla's launcher
  with `ray.tune.integration.ray_train.TuneReportCallback`, resuming from `tune.get_checkpoint()`. It trains to
  the next perturbation step and reports that step's val_loss to Tune with the checkpoint (Tune's PBT copies
  only checkpoints reported to it; TuneReportCallback hands Tune a checkpoint's path, not the checkpoint, so its
  report of that step is left to the trainable, which makes it once the checkpoint is written). Same mutations,
  resample probability, perturbation factors, quantile, synchronous generations, perturbation interval (30
  steps, time_attr = the reported "step"), number of trials and starting draws as the pbt-tiny sweep.

Every method runs on the same embedded Ray (all 2 cores), half a CPU per trainer worker (pbt-tiny's
cluster.cpus_per_worker: all 4 trials at once), trial drivers taking no CPU, and Ray Train collecting reports
every 0.25 s (tune.sweep.REPORT_POLL_S; the Ray Tune baseline gets the same). Before each method the script
waits (up to 10 minutes) for the 1-minute load average to drop under 1.0 and records it.

The time table is seed 0's (tune.seed: the starting draws and every explore decision; Ray Tune's PBT gets the
same starting draws and its scheduler's `random` seeded with it). One sweep's best val_loss depends on which
values its explore steps happened to draw, so best val_loss is also compared over more seeds (--seeds).

Where the time goes, in trial-seconds (4 trials run side by side, so the sums exceed the wall time):
- training: the training steps' own time (each step's step_time_s);
- start-up: from launching a trainer to its trainee built (Ray Train start-up, process group, model build);
- exploit: copying donors' checkpoints and loading them;
- between segments: waiting for the synchronous generation (ray-tune: from a trial's report at a perturbation
  step to its next trainer's launch, which also holds Tune pausing and restarting the trial);
- overhead per segment: each segment's wall time minus its training steps, start-up and wait left out
  (validation, checkpoint writes, reports, restores, check-in).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's `kernels` package, not bench/kernels.py next to this script
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "configs" / "pbt-tiny.yaml"
METHODS = ("segments", "persistent", "ray-tune")
QUIET_LOAD, QUIET_WAIT_S = 1.0, 600


def wait_for_quiet() -> float:
    """Wait up to QUIET_WAIT_S for the 1-minute load average to drop under QUIET_LOAD; returns it."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while os.getloadavg()[0] >= QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def flotilla_command(method: str, work: Path, overrides: list[str]) -> list[str]:
    extra = ["tune.reuse_workers=false"] if method == "segments" else []
    return ["flotilla", "sweep", str(CONFIG.relative_to(ROOT)),
            *[arg for o in [*extra, *overrides, f"tracking.run_name={method}", f"checkpoint.dir={work}"] for arg in ("-o", o)]]


def run_method(method: str, work: Path, overrides: list[str], seed: int, wait: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    overrides = [*overrides, f"tune.seed={seed}"] if seed else overrides
    cmd = (flotilla_command(method, work, overrides) if method != "ray-tune"
           else [sys.executable, "bench/sweep_overhead.py", "--ray-tune-sweep", str(work),
                 *[arg for o in overrides for arg in ("-o", o)]])
    load = wait_for_quiet() if wait and not overrides else os.getloadavg()[0]  # a quick check need not wait
    print(f"$ {' '.join(cmd)}  (load average {load:.2f})", flush=True)
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {done.returncode}")
    record = flotilla_record(work / method) if method != "ray-tune" else json.loads((work / "ray-tune.json").read_text())
    return {"method": method, "seed": seed, "command": " ".join(cmd), "wall_s": wall, "load_before": load,
            "load_after": os.getloadavg()[0], **record}


def flotilla_record(out: Path) -> dict:
    """The table's numbers from a finished Flotilla sweep's lineage.json and timings.json."""
    lineage = json.loads((out / "lineage.json").read_text())
    t = json.loads((out / "timings.json").read_text())
    last = max(s["stop"] for s in lineage["segments"])
    finals = {s["trial"]: s["score"] for s in lineage["segments"] if s["stop"] == last}
    return {"sweep_wall_s": t["wall_s"], "segments": t["segments"], "train_s": t["train_s"], "startup_s": t["startup_s"],
            "exploit_s": t["exploit_s"], "between_s": t["wait_s"], "overhead_per_segment_s": t["overhead_per_segment_s"],
            "startup_per_segment_s": t["startup_per_segment_s"], "exploits": len(lineage["exploits"]),
            "best_val_loss": min(finals.values()), "reuse_workers": t["reuse_workers"]}


# -- the Ray Tune baseline (runs in its own process: python bench/sweep_overhead.py --ray-tune-sweep WORK) ------

def _tune_key(key: str) -> str:
    return key.replace(".", "__")  # Tune's PBT mutates top-level config keys; a dot would read as nesting


def _tune_domain(mutation):
    from ray import tune

    if not mutation.is_range:
        return mutation.choices
    return tune.loguniform(mutation.low, mutation.high) if mutation.log else tune.uniform(mutation.low, mutation.high)


def _report_uncheckpointed():
    """Ray's TuneReportCallback for every report but the one carrying the segment's checkpoint, which the trainable
    reports itself, with the checkpoint: PBT must see that step's val_loss together with a checkpoint to copy."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportUncheckpointed(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None:
                super().after_report(run_context, metrics, checkpoint)

    return ReportUncheckpointed()


def ray_tune_trainable(params: dict, *, base, work: Path, keys: list[str]) -> None:
    """One trial under Tune's PBT: from Tune's checkpoint (its own, or a donor's after an exploit), a trainer per
    perturbation interval, each segment's val_loss and checkpoint reported to Tune."""
    import torch
    from ray import tune

    from orchestrator.launch import run_training
    from tune.sweep import REPORT_POLL_ENV, REPORT_POLL_S, with_hparams
    from tune.timings import STARTUP_METRIC
    from tune.trial import RESTORE_METRIC, segment_worker

    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    context = tune.get_context()
    name, trial_dir = context.get_trial_name(), Path(context.get_trial_dir())
    cfg = with_hparams(base, {key: params[_tune_key(key)] for key in keys})
    total, interval = base.train.steps, base.tune.perturbation_interval
    start, resume_from, exploited = 0, None, False
    if (checkpoint := tune.get_checkpoint()) is not None:
        resume_from = checkpoint.path
        start = torch.load(Path(resume_from) / "trainer_state.pt", weights_only=True)["step"]
        exploited = Path(resume_from).parent.name != trial_dir.name  # Tune restores an exploit from the donor's folder
    log = work / "ray-tune-segments.jsonl"
    while start < total:
        stop = min(total, (start // interval + 1) * interval)
        # fresh Ray Train storage per trainer, so it starts from `resume_from` and not from an older own checkpoint
        storage = work / "trainers" / name / f"{stop:06d}-{time.time_ns()}"
        seg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"dir": str(storage), "every": interval})})
        launched_at, began = time.time(), time.monotonic()
        outcome = run_training(seg, run_name=name, resume_from=resume_from,
                               worker_loop=functools.partial(segment_worker, stop_at=stop, launched_at=launched_at),
                               callbacks=[_report_uncheckpointed()])
        history = outcome.history
        first = lambda key: next((h[key] for h in history if key in h), None)  # noqa: E731
        score = next(h["val_loss"] for h in reversed(history) if "val_loss" in h and h["step"] == stop)
        startup = first(STARTUP_METRIC) or 0.0
        record = {"trial": name, "start": start, "stop": stop, "launched_at": launched_at, "reported_at": time.time(),
                  "wall_s": time.monotonic() - began - startup, "startup_s": startup,
                  "train_s": sum(h.get("step_time_s", 0.0) for h in history if start < h["step"] <= stop),
                  "restore_s": first(RESTORE_METRIC), "exploited": exploited, "score": score,
                  "hparams": {key: params[_tune_key(key)] for key in keys}}
        with log.open("a") as f:  # before reporting: Tune may stop this trial inside tune.report
            f.write(json.dumps(record) + "\n")
        tune.report({"step": stop, "val_loss": score}, checkpoint=tune.Checkpoint.from_directory(outcome.checkpoint))
        resume_from, start, exploited = outcome.checkpoint, stop, False


def ray_tune_sweep(work: Path, overrides: list[str]) -> None:
    """Ray Tune's PopulationBasedTraining over pbt-tiny; writes WORK/ray-tune.json with the table's numbers."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from orchestrator.config import load_config
    from orchestrator.data import prepare_data
    from orchestrator.ray_connect import connect_ray
    from tune.pbt import initial_population
    from tune.sweep import DRIVER_RESOURCES

    # PBT's results between perturbation steps carry the step but no val_loss (validation runs at those steps)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    base = prepare_data(load_config(CONFIG, [*overrides, f"checkpoint.dir={work / 'ray-tune'}"]))
    t = base.tune
    keys = list(t.mutations)
    starts = initial_population(t.mutations, t.num_samples, t.seed)  # the Flotilla sweep's starting draws
    # The MLflow store and experiment made here, once: 4 trials creating a fresh SQLite store at once race on
    # its schema (Flotilla's sweep makes its parent run first, which does the same)
    client = MlflowClient()
    if client.get_experiment_by_name(base.tracking.experiment) is None:
        client.create_experiment(base.tracking.experiment)
    connect_ray(None)
    random.seed(t.seed)  # Tune's PBT draws its exploit and explore choices from `random` in this process
    pbt = PopulationBasedTraining(
        time_attr="step", metric=t.metric, mode=t.mode, perturbation_interval=t.perturbation_interval,
        hyperparam_mutations={_tune_key(k): _tune_domain(m) for k, m in t.mutations.items()},
        quantile_fraction=t.quantile_fraction, resample_probability=t.resample_probability,
        perturbation_factors=tuple(sorted(t.perturbation_factors, reverse=True)), synch=t.synch, require_attrs=False)
    space = {"i": tune.grid_search(list(range(t.num_samples)))}
    for k in keys:
        space[_tune_key(k)] = tune.sample_from(functools.partial(lambda config, key: starts[config["i"]][key], key=k))
    trainable = functools.partial(ray_tune_trainable, base=base, work=work, keys=keys)
    began = time.monotonic()
    tune.Tuner(
        tune.with_resources(trainable, DRIVER_RESOURCES),
        param_space=space,
        tune_config=tune.TuneConfig(scheduler=pbt, max_concurrent_trials=t.num_samples),
        # the trials stop at the last step, where Flotilla's sweep decides nothing either
        run_config=tune.RunConfig(name="ray-tune", storage_path=str(work / "tune"), stop={"step": base.train.steps},
                                  verbose=0),
    ).fit()
    wall = time.monotonic() - began
    segments = [json.loads(line) for line in (work / "ray-tune-segments.jsonl").read_text().splitlines()]
    by_trial: dict[str, list[dict]] = {}
    for s in sorted(segments, key=lambda s: s["launched_at"]):
        by_trial.setdefault(s["trial"], []).append(s)
    between = sum(b["launched_at"] - a["reported_at"] for runs in by_trial.values() for a, b in zip(runs, runs[1:]))
    finals = [s["score"] for s in segments if s["stop"] == base.train.steps]
    n = len(segments)
    record = {"sweep_wall_s": wall, "segments": n, "train_s": sum(s["train_s"] for s in segments),
              "startup_s": sum(s["startup_s"] for s in segments),
              "exploit_s": sum(s["restore_s"] or 0.0 for s in segments if s["exploited"]), "between_s": between,
              "overhead_per_segment_s": sum(s["wall_s"] - s["train_s"] for s in segments) / n,
              "startup_per_segment_s": sum(s["startup_s"] for s in segments) / n,
              "exploits": sum(s["exploited"] for s in segments), "best_val_loss": min(finals),
              "trials_finished": len(finals)}
    (work / "ray-tune.json").write_text(json.dumps(record, indent=1))


# -- the report ----------------------------------------------------------------------------------------------

def quality_table(quality: dict[tuple[str, int], list[dict]], seeds: list[int], ranked: list[str]) -> list[str]:
    """Best val_loss by seed (the median of a seed's runs) and, with both Flotilla and Ray Tune at every seed, their
    paired difference: its mean with a 95% t interval, and the verdict the interval gives."""
    from scipy import stats

    best = {m: [statistics.median(r["best_val_loss"] for r in quality[(m, s)]) for s in seeds] for m in ranked}
    walls = {m: statistics.mean(statistics.median(r["wall_s"] for r in quality[(m, s)]) for s in seeds) for m in ranked}
    paired = {"persistent", "ray-tune"} <= set(ranked)
    lines = ["Best val_loss at step 120 by seed (the same starting draws for every method at a seed; segment restarts",
             "train exactly as persistent workers, the same decisions and losses, so they ran at seed 0 only):", "",
             "| seed | " + " | ".join(ranked) + (" | Flotilla - Ray Tune |" if paired else " |"),
             "|---|" + "---|" * (len(ranked) + paired)]
    for i, s in enumerate(seeds):
        cells = [f"{best[m][i]:.4f}" for m in ranked]
        if paired:
            cells.append(f"{best['persistent'][i] - best['ray-tune'][i]:+.4f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    means = [f"{statistics.mean(best[m]):.4f}" for m in ranked]
    lines.append("| mean | " + " | ".join(means) + (" | |" if paired else " |"))
    lines.append("| wall time, mean (s) | " + " | ".join(f"{walls[m]:.0f}" for m in ranked) + (" | |" if paired else " |"))
    if not paired:
        return lines
    diffs = [a - b for a, b in zip(best["persistent"], best["ray-tune"])]
    n, mean = len(diffs), statistics.mean(diffs)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / n**0.5
    lower = sum(d < 0 for d in diffs)
    sign_p = stats.binomtest(lower, sum(d != 0 for d in diffs)).pvalue
    if mean + half < 0:
        verdict = "Flotilla's best val_loss is lower than Ray Tune's: the interval lies below 0."
    elif mean - half > 0:
        verdict = "Flotilla's best val_loss is worse than Ray Tune's: the interval lies above 0."
    else:
        verdict = (f"not told apart from Ray Tune's by {n} seeds: the interval holds 0; it rules out Flotilla being "
                   f"worse on the mean by more than {mean + half:.4f}.")
    return lines + ["", f"Flotilla - Ray Tune over {n} seeds: mean {mean:+.4f}, 95% interval [{mean - half:+.4f}, "
                        f"{mean + half:+.4f}] (paired t); Flotilla lower at {lower} of {n} (sign test p = {sign_p:.2f}). "
                        f"Verdict: {verdict}"]


def write_report(results: list[dict], out: Path) -> None:
    import ray
    import torch

    runs: dict[str, list[dict]] = {}  # seed 0's runs of each method: the machine is shared, so timed more than once
    for r in results:
        if r.get("seed", 0) == 0:
            runs.setdefault(r["method"], []).append(r)

    def median(method: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[method])

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dates = sorted({r["date"] for r in results})
    lines = [
        "# Sweep overhead: persistent workers, segment restarts and Ray Tune's PBT",
        "",
        f"Measured {' and '.join(dates)} on {os.cpu_count()} cores of {cpu} (CPU only), Python {platform.python_version()}, "
        f"torch {torch.__version__}, Ray {ray.__version__}, Flotilla {rev}. Produced by `python bench/sweep_overhead.py`",
        "(its docstring has the setup; every command is listed at the end): the times at seed 0, timed twice (`--add`),",
        "each sweep on its own embedded Ray after waiting (up to 10 minutes) for the 1-minute load average to drop",
        "under 1.0; best val_loss at more seeds with `--methods persistent ray-tune --seeds ... --no-wait`. The",
        "machine is shared with other engineers' work, whose load sometimes rose during a sweep (the load average",
        "after each is listed): each time below is the median of the runs listed under it.",
        "",
        "Task and budget: configs/pbt-tiny.yaml, 4 trials x 120 steps of a 2-layer byte-level Llama on the Python",
        "stdlib, synchronous PBT every 30 steps (bottom 2 copy top 2: 3 generations, 6 exploits), half a CPU per",
        "trainer worker so all 4 trials run at once on the 2 cores. Times other than wall are trial-seconds summed",
        "over the 4 trials. Seed 0.",
        "",
        "| | persistent workers | segment restarts | Ray Tune PBT |",
        "|---|---|---|---|",
    ]
    rows = [("wall time, whole command (s)", "wall_s", "{:.0f}"), ("wall time, sweep (s)", "sweep_wall_s", "{:.0f}"),
            ("training steps (trial-s)", "train_s", "{:.1f}"), ("start-up (trial-s)", "startup_s", "{:.1f}"),
            ("exploit: copy + load (trial-s)", "exploit_s", "{:.1f}"),
            ("between segments: generation wait (trial-s)", "between_s", "{:.1f}"),
            ("segments", "segments", "{:.0f}"), ("start-up per segment (s)", "startup_per_segment_s", "{:.2f}"),
            ("overhead per segment, start-up and wait left out (s)", "overhead_per_segment_s", "{:.2f}"),
            ("exploits", "exploits", "{:.0f}"), ("best val_loss at step 120", "best_val_loss", "{:.4f}")]
    methods = ("persistent", "segments", "ray-tune")
    for label, key, fmt in rows:
        cells = [fmt.format(median(m, key)) if m in runs else "not run" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    each = ["; ".join(f"{r['wall_s']:.0f} s (load {r['load_before']:.2f} -> {r['load_after']:.2f})" for r in runs[m])
            if m in runs else "not run" for m in methods]
    lines.append("| runs: wall time (load average before -> after) | " + " | ".join(each) + " |")
    if "persistent" in runs:
        ratios = [f"{m} {median(m, 'wall_s') / median('persistent', 'wall_s'):.2f}x the persistent sweep's wall time "
                  f"({median(m, 'sweep_wall_s') / median('persistent', 'sweep_wall_s'):.2f}x sweep wall)"
                  for m in ("segments", "ray-tune") if m in runs]
        lines += ["", "Persistent workers, medians: " + "; ".join(ratios) + "."]
    seeds = sorted({r.get("seed", 0) for r in results})
    if len(seeds) > 1:
        quality: dict[tuple[str, int], list[float]] = {}
        for r in results:  # a Flotilla sweep is deterministic; Ray Tune's order of events is not
            quality.setdefault((r["method"], r.get("seed", 0)), []).append(r)
        ranked = [m for m in methods if all((m, s) in quality for s in seeds)]
        lines += ["", *quality_table(quality, seeds, ranked)]
    if len(seeds) > 1 and "ray-tune" in runs:
        lines += ["", "Both run the same PBT: the same exploit rule (bottom quantile copies a random top trial) and explore",
                  "(resample with probability 0.25, else x0.8 / x1.2; Flotilla clips to the mutation's range, Ray does",
                  "not), from the same starting draws, on identical training (at seed 0 both sweeps' first segments",
                  "score the same to 4 decimals, and a trial going on unexploited scores the same in both). What",
                  "differs is which values their explore steps drew, from different random streams; Ray Tune's seed-0",
                  "sweep itself scored differently on its two runs (its trials report in a different order each time)."]
    lines += ["", "Ray Tune's between-segments time also holds Tune pausing each trial at every generation and",
              "starting it again from its checkpoint (its synchronous PBT pauses every trial; an exploited one restarts",
              "from the donor's). Its trials' start-up is counted from each trainer's launch, as for the others.", "",
              "Commands (each with MLFLOW_TRACKING_URI set to a fresh SQLite store):", ""]
    lines += [f"- {r['method']}, seed {r.get('seed', 0)}, {r['date']} (load average {r['load_before']:.2f} before): "
              f"`{r['command']}`" for r in results]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="tune.seed of each sweep (default: 0)")
    parser.add_argument("--no-wait", action="store_true",
                        help="start each sweep at once, busy machine or not (for best val_loss at more seeds)")
    parser.add_argument("--add", action="store_true",
                        help="keep the recorded runs of the same methods and seeds: another timing, tables take medians")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flotilla-sweep-overhead"))
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the recorded results")
    parser.add_argument("-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method (a quick check on a smaller budget; not recorded)")
    parser.add_argument("--ray-tune-sweep", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_tune_sweep:
        ray_tune_sweep(args.ray_tune_sweep, args.overrides)
        return 0
    out = RESULTS / "sweep_overhead.json"
    results = json.loads(out.read_text()) if out.exists() else []
    if not args.report:
        from orchestrator.config import load_config
        from orchestrator.data import prepare_data

        prepare_data(load_config(CONFIG))  # the stdlib dataset built before any clock starts
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        fresh = []
        for seed in args.seeds:
            # segment restarts train exactly as persistent workers (the same decisions and losses): timed at seed 0 only
            for method in [m for m in args.methods if seed == args.seeds[0] or m != "segments"]:
                record = run_method(method, args.work / stamp / f"{method}-s{seed}", args.overrides, seed,
                                    wait=not args.no_wait)
                fresh.append({**record, "date": datetime.date.today().isoformat()})
                print(json.dumps(record), flush=True)
        if args.overrides:  # not the recorded task: shown, not kept
            results = fresh
            out = args.work / stamp / "sweep_overhead.json"
        else:
            ran = {(r["method"], r["seed"]) for r in fresh}
            results = [r for r in results if args.add or (r["method"], r.get("seed", 0)) not in ran] + fresh
        out.write_text(json.dumps(results, indent=1))
    write_report(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
