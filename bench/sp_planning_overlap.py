"""Does planning the next step's adaptive SP plan slow the step that trains meanwhile? On this machine's CPUs.

The executor plans step n+1 while step n trains (trainers/parallel/adaptive/executor.py). In a thread, the
planner's Python holds the GIL that the training thread needs between its kernels: on a GPU that thread does
little but launch kernels, so it waits. This times a training-like step alone and beside a planner that plans
64-device, 1,000-sequence `flexsp-7b` plans (bench/sp_planner.py's heavy mix):
- back to back (the worst case: a planner that never rests), in a thread or in the executor's planning process
  (PlanningProcess, spawned);
- one plan per step, as the executor plans (asked for as the step starts, read as the next one starts).
Steps, one torch thread each (a rank's training thread):
- model: forward, backward and AdamW step of a 4-layer, dim-256 transformer on 2 x 512 tokens: many small ops,
  Python dispatch between them, like a GPU rank's launch thread;
- matmul: four 1024 x 1024 float32 matmuls: long kernels that release the GIL.
The machine may be shared: a planner process then also waits for a core, which a GPU node's spare cores would
give it. So each step's wall time is split with the training thread's scheduler statistics
(/proc/thread-self/schedstat): on a core, waiting for a core (runnable, another process ran), and blocked (the
GIL, mostly); "without core waits" is the wall time less the wait for a core, what a machine with a core for
the planner would show. Rounds interleave the settings, each round starting from the next one, so a load that
changes during the run reaches them alike; each cell is the median over rounds of the setting's median, and a
slowdown the median over rounds of its ratio to "alone" in the same round.

Writes bench/results/sp_planning_overlap.md and .json. Usage: python bench/sp_planning_overlap.py [--rounds 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as `python bench/x.py`, sys.path[0] is bench/, where kernels.py would shadow the kernels package
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import datetime
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.sp_planner import MAX_LEN, batch
from trainers.config import ModelConfig
from trainers.model import build_model, init_weights
from trainers.parallel.adaptive import load_cost_model
from trainers.parallel.adaptive.executor import PlanningProcess, plan_step

RESULTS = Path(__file__).parent / "results"
DEVICES = 64
SEQUENCES = 1000
COST = load_cost_model("flexsp-7b")
BATCHES = [batch("heavy", SEQUENCES, MAX_LEN, seed).tolist() for seed in range(8)]
SETTINGS = ("alone", "thread, back to back", "process, back to back", "thread, one per step", "process, one per step")


def plan_args(i: int) -> tuple:
    lengths = BATCHES[i % len(BATCHES)]
    return list(range(len(lengths))), lengths, DEVICES, COST, None


def model_step() -> callable:
    cfg = ModelConfig(vocab_size=1024, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512)
    model = build_model(cfg, device="cpu")
    init_weights(model, cfg, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 512))

    def step() -> None:
        model(tokens).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def matmul_step() -> callable:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def step() -> None:
        for _ in range(4):
            a @ b

    return step


class BackToBack:
    """Plans without rest until stopped: in a thread of this process, or through the planning process from a
    thread that only waits on it."""

    def __init__(self, process: PlanningProcess | None):
        self.process, self.plans, self._stop = process, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.process is None:
                plan_step(*plan_args(self.plans))
            else:
                self.process.submit(self.plans, *plan_args(self.plans))
                self.process.result()
            self.plans += 1

    def __enter__(self) -> "BackToBack":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StepTimes:
    """Per step, in ms: wall, on a core, waiting for a core (the training thread's schedstat)."""

    def __init__(self):
        self.wall, self.cpu, self.queued = [], [], []

    @staticmethod
    def _now() -> tuple[float, int, int]:
        on_cpu, waiting, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return time.perf_counter(), int(on_cpu), int(waiting)

    def run(self, step) -> None:
        t0, c0, q0 = self._now()
        step()
        t1, c1, q1 = self._now()
        self.wall.append(1e3 * (t1 - t0))
        self.cpu.append((c1 - c0) / 1e6)
        self.queued.append((q1 - q0) / 1e6)

    def medians(self) -> dict[str, float]:
        return {"wall": statistics.median(self.wall), "on_core": statistics.median(self.cpu),
                "core_wait": statistics.median(self.queued),
                "blocked": statistics.median(w - c - q for w, c, q in zip(self.wall, self.cpu, self.queued)),
                "without_core_wait": statistics.median(w - q for w, q in zip(self.wall, self.queued))}


def timed_steps(step, n: int, setting: str, thread: ThreadPoolExecutor, process: PlanningProcess) -> tuple[dict, int]:
    """(StepTimes.medians of n steps, plans finished meanwhile) under `setting`."""
    times, plans = StepTimes(), 0
    if "back to back" in setting:
        with BackToBack(process if setting.startswith("process") else None) as planner:
            for _ in range(n):
                times.run(step)
        return times.medians(), planner.plans
    pending = None

    def planned_step(i: int) -> None:
        nonlocal pending, plans
        if setting == "thread, one per step":
            if pending is not None:
                pending.result()
                plans += 1
            pending = thread.submit(plan_step, *plan_args(i))
        elif setting == "process, one per step":
            if process.pending is not None:
                process.result()
                plans += 1
            process.submit(i, *plan_args(i))
        step()

    for i in range(n):
        times.run(lambda: planned_step(i))
    if pending is not None:
        pending.result()
    if process.pending is not None:
        process.result()
    return times.medians(), plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per setting and round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    planning_ms = statistics.median(plan_step(*plan_args(i)).planning_ms for i in range(len(BATCHES)))
    process, thread = PlanningProcess(), ThreadPoolExecutor(max_workers=1)
    process.submit(-1, *plan_args(0))
    process.result()  # started, imported and warm
    rows, raw = [], {}
    for name, make in (("model", model_step), ("matmul", matmul_step)):
        step = make()
        for _ in range(3):
            step()  # first-touch allocations
        cells = {s: [] for s in SETTINGS}
        plans = {s: 0 for s in SETTINGS}
        for r in range(args.rounds):
            for setting in SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]:  # no setting always first
                medians, done = timed_steps(step, args.steps, setting, thread, process)
                cells[setting].append(medians)
                plans[setting] += done
        raw[name] = {"per_round": cells, "plans": plans}

        def over_rounds(setting: str, key: str) -> float:
            return statistics.median(c[key] for c in cells[setting])

        def slowdown(setting: str, key: str) -> str:
            if setting == "alone":
                return ""
            ratio = statistics.median(c[key] / a[key] - 1 for c, a in zip(cells[setting], cells["alone"]))
            return f"{100 * ratio:+.1f}%"

        for setting in SETTINGS:
            rows.append(f"| {name} | {setting} | {over_rounds(setting, 'wall'):.1f} | {slowdown(setting, 'wall')} | "
                        f"{over_rounds(setting, 'core_wait'):.1f} | {over_rounds(setting, 'blocked'):.1f} | "
                        f"{over_rounds(setting, 'without_core_wait'):.1f} | {slowdown(setting, 'without_core_wait')} | "
                        f"{plans[setting]} |")
    process.close()
    thread.shutdown()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    text = "\n".join([
        "# Adaptive SP: planning the next step beside the training thread", "",
        f"- device: {cpu}, {os.cpu_count()} cores (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end: other work shares them); {datetime.date.today()}; "
        f"python {platform.python_version()}, torch {torch.__version__}; one torch thread",
        f"- command: `python bench/sp_planning_overlap.py --rounds {args.rounds} --steps {args.steps}`",
        f"- planner: `flexsp-7b`, {DEVICES} devices, {SEQUENCES} sequences of the heavy mix, "
        f"{planning_ms:.0f} ms a plan (median, alone)", "",
        "| step | planner | step ms | slower | waiting for a core, ms | blocked (GIL), ms | step ms without core "
        "waits | slower | plans during the steps |", "|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sp_planning_overlap.md").write_text(text)
    (RESULTS / "sp_planning_overlap.json").write_text(json.dumps(
        {"planning_ms": planning_ms, "rounds": args.rounds, "steps": args.steps, "load": load, **raw}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
