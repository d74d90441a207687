"""`flotilla plan CONFIG --lengths FILE`: the adaptive SP plan of one batch of sequence lengths, next to static
Ulysses (one degree, the smallest that holds the longest sequence) and the best homogeneous degree for that
batch, all estimated with the config's cost model (parallel.adaptive) and within the largest group degree the
attention can split (trainers.parallel.adaptive.topology; the nodes are unknown before Ray places the workers).
Pure: nothing starts."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import Config, ConfigError

GiB = 2**30


def read_lengths(path: Path) -> list[int]:
    """One positive integer per line; blank lines are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"--lengths {path}: cannot read it: {err.strerror}") from None
    lengths = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = int(line)
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"--lengths {path}, line {number}: {line.strip()!r} is not a sequence length "
                              "(one positive integer per line)")
        lengths.append(value)
    if not lengths:
        raise ConfigError(f"--lengths {path}: no lengths in it (one positive integer per line)")
    return lengths


def adaptive_report(config: Config, lengths: list[int]) -> dict:
    """The JSON `flotilla plan --lengths --json` prints: the adaptive plan (sequences are indices into
    `lengths`), its estimate, static Ulysses' and the best homogeneous degree's, the planning time, the cap on
    group degrees and why, and the memory each device is planned with."""
    from trainers.parallel.adaptive import (InfeasibleError, best_homogeneous, load_cost_model, plan_adaptive,
                                            plan_homogeneous, static_degree)
    from trainers.parallel.adaptive.topology import max_group_degree

    settings = config.parallel.adaptive
    cost = load_cost_model(settings.cost_model).with_token_cap(settings.max_tokens_per_device)
    devices, heads = config.parallel.sp, config.model.n_heads
    cap = max_group_degree(devices, heads)
    try:
        started = time.perf_counter()
        plan = plan_adaptive(lengths, devices, cost, max_degree=cap)
        planning_ms = (time.perf_counter() - started) * 1e3
        degree = static_degree(lengths, devices, cost, max_degree=cap)
        static = plan_homogeneous(lengths, devices, cost, degree)
        best = best_homogeneous(lengths, devices, cost, max_degree=cap)
    except InfeasibleError as err:
        raise ConfigError(f"{err} (parallel.sp = {devices}, largest group degree {cap}, "
                          f"parallel.adaptive.cost_model = {settings.cost_model!r})") from None
    report = plan.to_json_dict()
    report["planning_ms"] = planning_ms
    report["cost_model"] = cost.name
    report["max_degree"] = {"degree": cap, "why": f"the largest power of two dividing model.n_heads = {heads} (Ulysses "
                                                  f"gives each rank of a group whole query heads) within parallel.sp = "
                                                  f"{devices}"}
    # ZeRO-3's model states: trainers/loop.py reduce-scatters the gradients after every micro-batch of adaptive SP
    report["memory"] = {"model_state_bytes": cost.model_state_bytes(devices),
                        "tokens_per_device": cost.max_tokens(1, devices), "cap_bytes": cost.memory_cap_bytes}
    report["static"] = {"degree": degree, "estimated_s": static.estimated_s}
    report["best_homogeneous"] = {"degree": best.micro_batches[0].groups[0].degree, "estimated_s": best.estimated_s}
    return report


def format_adaptive(report: dict, lengths: list[int]) -> str:
    cap, memory = report["max_degree"], report["memory"]
    lines = [f"adaptive sequence parallelism over {report['devices']} device(s), cost model {report['cost_model']}: "
             f"{len(lengths)} sequences, {sum(lengths):,} tokens, longest {max(lengths):,}",
             f"  groups of degree at most {cap['degree']}: {cap['why']}",
             f"  per device: {memory['model_state_bytes'] / GiB:.2f} GiB of model states (weights, gradients and "
             f"AdamW's moments, sharded over all {report['devices']} devices; gradients reduce-scattered after every "
             f"micro-batch) under a {memory['cap_bytes'] / GiB:.1f} GiB cap: room for "
             f"{memory['tokens_per_device']:,.0f} tokens"]
    for i, micro in enumerate(report["micro_batches"]):
        degrees = "+".join(str(g["degree"]) for g in micro["groups"])
        lines.append(f"  micro-batch {i}: groups {degrees}, estimated {micro['estimated_s']:.3f} s")
        for g in micro["groups"]:
            tokens = sum(lengths[s] for s in g["sequences"])
            ranks = f"{g['ranks'][0]}-{g['ranks'][-1]}" if len(g["ranks"]) > 1 else str(g["ranks"][0])
            lines.append(f"    degree {g['degree']:<3} ranks {ranks:<7} {len(g['sequences']):>4} sequences {tokens:>9,} tokens")
    adaptive, static, best = report["estimated_s"], report["static"], report["best_homogeneous"]
    lines += [f"estimated step: adaptive {adaptive:.3f} s (planned in {report['planning_ms']:.1f} ms)",
              f"  static Ulysses, degree {static['degree']}: {static['estimated_s']:.3f} s ({static['estimated_s'] / adaptive:.2f}x)",
              f"  best homogeneous, degree {best['degree']}: {best['estimated_s']:.3f} s ({best['estimated_s'] / adaptive:.2f}x)"]
    return "\n".join(lines)
