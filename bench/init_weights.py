"""init_weights per rank: time and peak host memory when every rank initialises its shard of a sharded model.

    python bench/init_weights.py                      # 4 CPU ranks (gloo), dp_shard=4, a 155M-parameter model
    python bench/init_weights.py --tp 2 --ranks 4     # tp=2 x dp_shard=2

Each rank builds the model on the meta device, shards it as `flotilla train` does (apply_tp, apply_fsdp),
materialises its shard (`to_empty`), then times `init_weights` and reads the peak of its resident set during
it (Linux: VmHWM after resetting it through /proc/self/clear_refs). The table goes to
bench/results/init_weights.md with device, date, versions and the machine's load (the ranks share its cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=2816, max_seq_len=2048)
"""155M parameters (621 MB in float32): the largest tensors are the 131 MB embedding and output matrices."""
MiB = 2**20


def _resident_peak() -> int:
    """Bytes: the peak resident set since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _rank(tp: int, out_dir: str) -> None:
    import gc

    import torch
    import torch.distributed as dist

    from trainers.config import ModelConfig
    from trainers.model import build_model, init_weights, num_params
    from trainers.parallel import apply_fsdp, apply_tp, build_mesh
    from trainers.parallel.mesh import ParallelDims

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = ModelConfig(**MODEL)
    dims = ParallelDims(world, dp_shard=world // tp, tp=tp)
    mesh = build_mesh(dims, "cpu")
    model = build_model(cfg, device="meta")
    if tp > 1:
        model = apply_tp(model, mesh["tp"])
    model = apply_fsdp(model, mesh, torch.float32)
    model.to_empty(device="cpu")
    gc.collect()
    dist.barrier()
    resident = _resident_peak()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from what is resident now
    start, cpu_start = time.perf_counter(), time.process_time()
    init_weights(model, cfg, seed=0)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _resident_peak()
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_extra": peak - resident, "local_bytes": local,
        "params": num_params(model)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--label", default="", help="what this run measures (e.g. 'before'), for the table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "init_weights.md")
    args = parser.parse_args()

    import torch

    from tests.distributed.spawn import spawn

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_rank, args.ranks, args.tp, tmp, tmp=Path(tmp))
        rows = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")), key=lambda r: r["rank"])
    layout = f"dp_shard={args.ranks // args.tp}" + (f" x tp={args.tp}" if args.tp > 1 else "")
    header = (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, cpu ({platform.machine()}, {os.cpu_count()} cores), "
              f"torch {torch.__version__}, Python {platform.python_version()}; load average {load[0]:.1f} before "
              f"the run. {rows[0]['params'] / 1e6:.0f}M parameters, {layout} on {args.ranks} gloo ranks.")
    lines = [f"## init_weights {args.label}".rstrip(), "", header, "",
             "| rank | init wall (s) | init CPU time (s) | peak extra resident (MiB) | its shard (MiB) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_extra'] / MiB:,.0f} | "
              f"{r['local_bytes'] / MiB:,.0f} |" for r in rows]
    lines += ["", "Peak extra resident: above what was resident when init began, the shard's own pages included "
              "(to_empty leaves them untouched until init writes them)."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"label": args.label, "header": header, "rows": rows}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
