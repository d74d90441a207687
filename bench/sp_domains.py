"""How evenly does adaptive SP split a step between SP domains (parallel.dp_replicate x parallel.sp)? For each
layout and length mix, the cost model's estimate of the slowest domain over the domains' mean (1 is an even
split), for the sequences dealt out by count, the greedy split alone (trainers/parallel/adaptive/domains.py
step 1) and with its refinement (step 2, what the executor runs: plan_domains), with the plans the refinement
added and the wall time of plan_domains; and the refinement's constants against larger ones.

flexsp-7b, groups capped at min(32, S) (Llama-7B's 32 heads), 512 sequences a step cut at what a group of the cap
holds; bench/sp_planner.py's length mixes and seeds (1000 on: the planner's constants were chosen on 0-99).
Estimates, not measured step times. Writes OUT.md and OUT.json (default bench/results/sp_domains); about 3
minutes on 2 cores:
    python bench/sp_domains.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as `python bench/x.py`, sys.path[0] is bench/, where kernels.py would shadow the kernels package
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import time
from unittest import mock

import numpy as np

from bench.sp_planner import batch, describe_machine, longest
from trainers.parallel.adaptive import domains as domain_split
from trainers.parallel.adaptive import load_cost_model, plan_adaptive
from trainers.parallel.adaptive.domains import plan_domains, split_step

RESULTS = Path(__file__).parent / "results"
LAYOUTS = ((2, 32), (4, 16), (8, 8))
MIXES = ("heavy", "lognormal")


def imbalance(times: list[float]) -> float:
    return max(times) / (sum(times) / len(times))


def share_times(lengths: np.ndarray, shares, devices: int, cost, cap: int) -> list[float]:
    return [plan_adaptive(lengths[list(s)], devices, cost, cap).estimated_s for s in shares]


def counting_plans(cost):
    """plan_adaptive as domains.py calls it, counting the calls."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return plan_adaptive(*args, **kwargs)
    return calls, mock.patch.object(domain_split, "plan_adaptive", counted)


def cell(cost, domains: int, devices: int, mix: str, seeds: range) -> dict:
    cap = min(32, devices)
    rows = []
    for seed in seeds:
        lengths = batch(mix, 512, longest(cost, devices, cap), seed)
        by_count = tuple(tuple(range(r, len(lengths), domains)) for r in range(domains))
        greedy = split_step(lengths, domains, devices, cost, cap)
        calls, patch = counting_plans(cost)
        with patch:
            started = time.perf_counter()
            plans = plan_domains(lengths, domains, devices, cost, cap)
            ms = (time.perf_counter() - started) * 1e3
        variants = {}
        for rounds, candidates in ((8, 3), (4, 6)):
            with mock.patch.multiple(domain_split, REFINE_ROUNDS=rounds, REFINE_CANDIDATES=candidates):
                variants[f"{rounds}x{candidates}"] = plan_domains(lengths, domains, devices, cost, cap).imbalance
        rows.append({"seed": seed, "by_count": imbalance(share_times(lengths, by_count, devices, cost, cap)),
                     "greedy": imbalance(share_times(lengths, greedy, devices, cost, cap)),
                     "refined": plans.imbalance, "estimated_s": plans.estimated_s,
                     "added_plans": len(calls) - domains, "planning_ms": ms, **variants})
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    summary = {key: {"median": float(np.median(col(key))), "worst": float(max(col(key)))}
               for key in ("by_count", "greedy", "refined", "8x3", "4x6", "added_plans", "planning_ms")}
    return {"domains": domains, "devices": devices, "mix": mix, "max_degree": cap, "rows": rows, **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--seeds-from", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS / "sp_domains", help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    cost = load_cost_model("flexsp-7b")
    seeds = range(args.seeds_from, args.seeds_from + args.batches)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    cells = [cell(cost, r, s, mix, seeds) for r, s in LAYOUTS for mix in MIXES]
    machine = describe_machine() | {"load_before": load_before, "load_after": os.getloadavg()[0]}
    lines = ["# Adaptive SP over SP domains: the estimated slowest domain over the mean, by split", "",
             f"- flexsp-7b, 512 sequences a step, seeds {seeds.start}-{seeds.stop - 1}; estimates, not measured times",
             f"- machine: {machine['cpu']}, {machine['cores']} cores; {machine['date']}; Python {machine['python']}, "
             f"numpy {machine['numpy']}; commit {machine['commit']}; {(time.perf_counter() - started) / 60:.0f} min; "
             f"1-minute load {machine['load_before']:.1f} before, {machine['load_after']:.1f} after (planning ms "
             "grows with it)",
             f"- command: `python bench/sp_domains.py --batches {args.batches} --seeds-from {args.seeds_from}`",
             "- refined = what the executor runs (4 rounds x 3 candidates); 8x3, 4x6: more rounds or candidates",
             "- planning ms: plan_domains's wall time, every domain's share planned and refined (the executor runs "
             "it in its planning process, beside the step before)", "",
             "| R x S | mix | by count | greedy | refined | 8x3 | 4x6 | plans added | planning ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        pair = lambda key, f="{:.3f}": f"{f.format(c[key]['median'])} ({f.format(c[key]['worst'])})"  # noqa: E731
        lines.append(f"| {c['domains']} x {c['devices']} | {c['mix']} | {pair('by_count')} | {pair('greedy')} | "
                     f"{pair('refined')} | {pair('8x3')} | {pair('4x6')} | {pair('added_plans', '{:.0f}')} | "
                     f"{pair('planning_ms', '{:.0f}')} |")
    lines.append("")
    lines.append("Each cell: median (worst) over the seeds.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "cells": cells}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
