"""Does the profiled cost model predict the adaptive SP executor's step times? On this machine's CPUs.

1. `flotilla profile`'s measurement (orchestrator.profile_sp) on 4 Ray Train workers of half a CPU each (gloo):
   forward+backward of packed micro-batches by length and count, all-to-alls by degree -> a JSON cost model.
2. The 4-process executor trains N steps of long-tailed synthetic documents with that cost model; each step's
   plan estimate (sp/estimated_s) is set against its measured step time (step_time_s).
Writes bench/results/adaptive_sp_executor.md (and .json). Usage: python bench/sp_executor.py [--steps 12]
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
import socket
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import Config, check_config
from orchestrator.profile_sp import profile

RESULTS = Path(__file__).parent / "results"
DEVICES = 4


def bench_config(steps: int, cost_model: str) -> Config:
    config = Config.model_validate({
        "model": {"vocab_size": 320, "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 2048},
        "data": {"source": "synthetic", "synthetic_docs": 3000, "synthetic_mean_len": 300, "batching": "documents"},
        "train": {"steps": steps, "tokens_per_step": 8192, "max_doc_len": 2048, "seq_len": 256, "val_every": 0,
                  "log_every": 1, "seed": 0},
        "parallel": {"sp": DEVICES, "dp_shard": 1, "sp_mode": "adaptive",
                     "adaptive": {"cost_model": cost_model, "max_tokens_per_device": 1024}},
        "cluster": {"num_workers": DEVICES, "cpus_per_worker": 0.5},  # 4 workers on a 2-core machine
    })
    check_config(config)
    return config


def _train(rank: int, world: int, port: int, trainer_json: str, root: str, out: str) -> None:
    from trainers.config import TrainerConfig
    from trainers.reporter import LocalReporter
    from trainers.run import run

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        reporter = LocalReporter(Path(root))
        run(TrainerConfig.model_validate_json(trainer_json), reporter)
        if rank == 0:
            Path(out).write_text(json.dumps(reporter.metrics))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_metrics(config: Config) -> list[dict]:
    from trainers.config import TrainerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        trainer = TrainerConfig.model_validate(config.trainer_sections()).model_dump_json()
        mp.start_processes(_train, args=(DEVICES, port, trainer, str(Path(tmp) / "ckpt"), str(out)), nprocs=DEVICES,
                           start_method="spawn")
        return [m for m in json.loads(out.read_text()) if "loss" in m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    cost_path = RESULTS / "adaptive_sp_cpu_cost.json"
    cost = profile(bench_config(args.steps, "flexsp-7b"), cost_path).cost
    steps = train_metrics(bench_config(args.steps, str(cost_path)))[1:]  # step 1 pays the first-touch warm-up
    estimated = np.array([m["sp/estimated_s"] for m in steps])
    measured = np.array([m["step_time_s"] for m in steps])
    error = (estimated - measured) / measured
    rows = [f"| {m['step']} | {int(m['sp/micro_batches'])} | "
            + " ".join(f"{int(m.get(f'sp/groups_degree_{d}', 0))}x{d}" for d in (1, 2, 4)) + f" | {e:.3f} | {t:.3f} | {100 * r:+.1f}% |"
            for m, e, t, r in zip(steps, estimated, measured, error)]
    summary = {"mean_abs_error": float(np.mean(np.abs(error))), "median_error": float(np.median(error)),
               "total_estimated_s": float(estimated.sum()), "total_measured_s": float(measured.sum())}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    text = "\n".join([
        "# Adaptive SP: the profiled CPU cost model against the 4-process executor's measured step times", "",
        f"- device: {cpu}, {os.cpu_count()} cores, {DEVICES} gloo processes; {datetime.date.today()}; "
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `python bench/sp_executor.py --steps {args.steps}`",
        f"- profiled: a1 {cost.attention_ms_per_token2:.3g} ms/token^2, a2 {cost.linear_ms_per_token:.3g} ms/token, "
        f"b {cost.overhead_ms:.3g} ms, all-to-all GB/s {({d: round(v, 3) for d, v in cost.alltoall_gbps.items()})}, "
        f"latency ms {({d: round(v, 3) for d, v in cost.alltoall_latency_ms.items()})} "
        f"(`{cost_path.relative_to(RESULTS.parent.parent)}`)",
        "- workload: synthetic log-normal documents (mean 300 tokens) cut at 2,048, 8,192 tokens a step, at most "
        "1,024 tokens per device a micro-batch; model dim 128, 2 layers, 4 heads", "",
        "| step | micro-batches | groups | estimated s | measured s | error |", "|---|---|---|---|---|---|", *rows, "",
        f"Mean absolute error {100 * summary['mean_abs_error']:.1f}%, median error {100 * summary['median_error']:+.1f}%; "
        f"over the run estimated {summary['total_estimated_s']:.2f} s, measured {summary['total_measured_s']:.2f} s.",
        "The estimate leaves out the optimizer step and the gradient reduction after the last micro-batch.", ""])
    (RESULTS / "adaptive_sp_executor.md").write_text(text)
    (RESULTS / "adaptive_sp_executor.json").write_text(json.dumps({"steps": steps, **summary}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
