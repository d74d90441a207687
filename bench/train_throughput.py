"""Training throughput of one model trained four ways, side by side in one run: transformers' LlamaForCausalLM
eager and under torch.compile, Flotilla's fsdp engine and its deepspeed engine (ZeRO-2).

    python bench/train_throughput.py            # on a GPU: configs/llama-1b.yaml's 1.1B model, micro-batch 8,
                                                # sequence 2048, bf16, 20 steps (5 untimed) per engine
    python bench/train_throughput.py --smoke    # anywhere: tiny dims, 4 steps, float32 on a CPU; checks the
                                                # plumbing and that every engine computes the same losses

What is the same for every engine: the initial weights (trainers.model.init_weights, mapped to HF's names by
trainers.hf), the batches (the config's training rows, in order), the loss (trainers.loop.summed_cross_entropy
over the valid targets), the precision (bf16 compute with float32 master weights and AdamW moments; float32
throughout in the CPU smoke run), AdamW's hyperparameters with weight decay on matrices only, a constant
learning rate (optim.lr), and clipping at train.grad_clip. Rows are plain causal sequences: HF has no document
masks, so this is not the packed-document attention Flotilla's loop runs.
- hf-eager: LlamaForCausalLM (SDPA attention), float32 weights under bf16 autocast, torch AdamW (fused on CUDA),
  clip_grad_norm_;
- hf-compiled: the same module under torch.compile (on a CPU the smoke run uses the aot_eager backend:
  inductor's C++ build would dominate the run);
- fsdp: trainers.run.build as a one-worker Ray Train run gets it: FSDP2 over a one-rank process group, bf16
  mixed precision (float32 reduction), the kernels and optimizer that `auto` picks (listed in the results);
- deepspeed-zero2: trainers.run.build with parallel.engine = deepspeed, zero_stage = 2 (DeepSpeed's bf16
  optimizer: float32 master weights and moments), torch AdamW as the client optimizer;
- on CUDA also fsdp-compiled (parallel.compile) and fsdp-triton (every Triton kernel, FLOTILLA_KERNELS=triton).
Timing: the first --warmup steps (compilation, allocator growth) are not timed; then wall time over the other
steps, synchronised on CUDA. tokens/s counts every input token. MFU = tokens/s x trainers.model.flops_per_token
(PaLM's 6N + 12LHDS) / the GPU's dense bf16 peak (trainers.metrics.PEAK_BF16_FLOPS; n/a on a CPU). Peak memory
is torch.cuda.max_memory_allocated over the engine's build and steps, less what was allocated before it (n/a on
a CPU). Ratio: tokens/s over hf-compiled's. The table is printed last and written, with device, date and
versions, to bench/results/train_throughput.md and .json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as `python bench/x.py`, sys.path[0] is bench/, where kernels.py would shadow the kernels package
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import datetime
import gc
import json
import math
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import kernels
from orchestrator.config import Config, load_config
from trainers.attention import CAUSAL, attention_choice
from trainers.data import IGNORE_INDEX, build_splits
from trainers.hf import to_hf
from trainers.loop import summed_cross_entropy
from trainers.metrics import peak_flops
from trainers.model import build_model, flops_per_token, init_weights, kernel_choice
from trainers.run import build

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("hf-eager", "hf-compiled", "fsdp", "deepspeed-zero2")
CUDA_EXTRAS = ("fsdp-compiled", "fsdp-triton")
SMOKE_MODEL = {"vocab_size": 128, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
               "max_seq_len": 64}
"""Tiny, with GQA (2 query heads per kv head) and an MLP width that is not Llama's rule, so a wrong weight
mapping between the engines shows in the first loss."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "llama-1b.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny dims, 4 steps, float32 on a CPU")
    parser.add_argument("--steps", type=int, help="steps per engine (default 20; smoke 4)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (default 5; smoke 1)")
    parser.add_argument("--micro-batch", type=int, help="rows per step (default 8, DESIGN.md's anchor; smoke 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default the config's; smoke 32)")
    parser.add_argument("--engines", nargs="+", choices=REQUIRED + CUDA_EXTRAS,
                        help="default: the four, and on CUDA also " + ", ".join(CUDA_EXTRAS))
    parser.add_argument("--compile-backend", help="torch.compile backend for hf-compiled and fsdp-compiled "
                        "(default inductor; aot_eager in the smoke run on a CPU)")
    parser.add_argument("--out", type=Path, help="markdown results; the .json goes beside it (default "
                        "bench/results/train_throughput.md; with --smoke, a temporary file)")
    return parser.parse_args(argv)


@dataclass
class Setup:
    """What every engine shares."""

    cfg: Config
    device: torch.device
    batches: list  # of (tokens, targets), each (B, S) int64 on the device
    init_state: dict  # our parameter name -> float32 CPU tensor
    compute_dtype: torch.dtype
    compile_backend: str


def run_config(args: argparse.Namespace, use_gpu: bool) -> Config:
    dtype = "bfloat16" if use_gpu else "float32"
    overrides = [f"train.dtype={dtype}", "train.grad_accum=1", "optim.warmup_steps=0", "optim.schedule=constant",
                 f"train.micro_batch_size={args.micro_batch}", f"train.seq_len={args.seq_len}",
                 f"train.steps={args.steps}", "cluster.num_workers=1", f"cluster.use_gpu={str(use_gpu).lower()}",
                 "parallel.dp_shard=1"]
    if args.smoke:
        # a learning rate high enough that four steps move the loss, so agreeing losses mean agreeing updates
        overrides += [f"model.{k}={v}" for k, v in SMOKE_MODEL.items()]
        overrides += ["data.synthetic_docs=200", "data.synthetic_mean_len=20", "optim.lr=1e-2"]
    return load_config(args.config, overrides)


def make_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    cfg = run_config(args, device.type == "cuda")
    rows, _, _ = build_splits(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    b = cfg.train.micro_batch_size
    if len(rows) < b:
        raise SystemExit(f"the training split has {len(rows)} rows, fewer than one batch of {b}")
    batches = []
    for step in range(cfg.train.steps):
        batch = rows.batch([(step * b + i) % len(rows) for i in range(b)])
        batches.append((batch.tokens.to(device), batch.targets.to(device)))
    model = build_model(cfg.model, device="meta").to_empty(device="cpu")
    init_weights(model, cfg.model, cfg.train.seed)
    backend = args.compile_backend or ("aot_eager" if args.smoke and device.type != "cuda" else "inductor")
    return Setup(cfg, device, batches, {k: v.detach().clone() for k, v in model.state_dict().items()},
                 torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32, backend)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loop's loss: summed token losses over the count of valid targets."""
    return summed_cross_entropy(logits, targets) / (targets != IGNORE_INDEX).sum()


# --- engines: each returns a step function (tokens, targets) -> (loss, grad norm) and what it runs -----------

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    if isinstance(optimizer, kernels.FusedAdamW):
        return f"FusedAdamW ({str(optimizer.moments_dtype).removeprefix('torch.')} moments)"
    return "torch AdamW" + (" (fused)" if optimizer.defaults.get("fused") else "")


def hf_engine(s: Setup, compiled: bool) -> tuple[StepFn, str]:
    model = build_model(s.cfg.model, device="meta").to_empty(device="cpu")
    model.load_state_dict(s.init_state)
    hf = to_hf(model, s.cfg.model).to(s.device).train()
    del model
    o = s.cfg.optim
    groups = [{"params": [p for p in hf.parameters() if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in hf.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=s.device.type == "cuda" or None)
    forward = torch.compile(hf, backend=s.compile_backend) if compiled else hf
    autocast = s.compute_dtype != torch.float32

    def step(tokens, targets):
        with torch.autocast(s.device.type, dtype=s.compute_dtype, enabled=autocast):
            logits = forward(input_ids=tokens).logits
        loss = loss_of(logits, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), s.cfg.train.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), float(norm)

    what = f"LlamaForCausalLM ({hf.config._attn_implementation} attention), {describe_optimizer(optimizer)}"
    return step, what + (f", torch.compile({s.compile_backend})" if compiled else "")


def flotilla_engine(s: Setup, engine: str, compile_blocks: bool = False) -> tuple[StepFn, str]:
    data = s.cfg.model_dump()
    data["parallel"].update(engine=engine, zero_stage=2 if engine == "deepspeed" else 0, compile=compile_blocks)
    cfg = type(s.cfg).model_validate(data)
    t = build(cfg, use_gpu=s.device.type == "cuda")
    # what the model runs under model.attention / model.kernels (auto unless the config says otherwise)
    m = cfg.model  # the bench's rows are plain causal sequences (no document boundaries)
    attention, _ = attention_choice(m.attention, s.device, batch=CAUSAL, dtype=cfg.train.dtype, head_dim=m.head_dim,
                                    gqa=m.kv_heads < m.n_heads)
    chosen = [f"attention {attention}"]
    chosen += [f"{k} {kernel_choice(cfg.model.kernels, k, s.device)[0]}" for k in ("rms_norm", "rope", "swiglu")]
    optimizer = describe_optimizer(t.optimizer)

    def step(tokens, targets):
        t.engine.set_gradient_sync(True)
        with torch.autocast(t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None):
            logits = t.model(tokens)
        loss = loss_of(logits, targets)
        t.engine.backward(loss)
        norm = t.engine.step()
        return float(loss.detach()), norm

    what = (f"{type(t.engine).__name__}, {optimizer}" + (", blocks compiled" if compile_blocks else "")
            + f"; {', '.join(chosen)}")
    return step, what


def build_engine(name: str, s: Setup) -> tuple[StepFn, str]:
    if name in ("hf-eager", "hf-compiled"):
        return hf_engine(s, compiled=name == "hf-compiled")
    if name == "deepspeed-zero2":
        return flotilla_engine(s, "deepspeed")
    return flotilla_engine(s, "fsdp", compile_blocks=name == "fsdp-compiled")


# --- measuring -------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, s: Setup, warmup: int) -> dict:
    torch.manual_seed(s.cfg.train.seed)
    held_before = 0
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(s.device)
        held_before = torch.cuda.memory_allocated(s.device)  # the batches, and whatever an engine left behind
    forced = kernels.force_implementation("triton" if name == "fsdp-triton" else None)
    with forced:
        step, what = build_engine(name, s)
        losses, norms, seconds = [], [], 0.0
        for i, (tokens, targets) in enumerate(s.batches):
            synchronize(s.device)
            started = time.perf_counter()
            loss, norm = step(tokens, targets)  # float(): waits for the step on the device
            synchronize(s.device)
            if i >= warmup:
                seconds += time.perf_counter() - started
            losses.append(loss)
            norms.append(norm)
    timed = len(s.batches) - warmup
    tokens_per_s = timed * s.batches[0][0].numel() / seconds if timed > 0 and seconds > 0 else math.nan
    peak = peak_flops(s.cfg, s.device)
    row = {"engine": name, "runs": what, "tokens_per_s": tokens_per_s,
           "mfu": tokens_per_s * flops_per_token(s.cfg.model, s.cfg.train.seq_len) / peak if peak else None,
           "peak_memory_gib": ((torch.cuda.max_memory_allocated(s.device) - held_before) / 2**30
                               if s.device.type == "cuda" else None),
           "losses": losses, "grad_norms": norms}
    del step
    gc.collect()
    return row


def join_one_rank_group(device: torch.device) -> None:
    """A one-rank process group, as Ray Train gives a lone worker: FSDP2 and DeepSpeed both need one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


# --- report ----------------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    import deepspeed  # only now: trainers.engines.deepspeed sets DS_ACCELERATOR before DeepSpeed's first import
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "triton": triton_version, "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def table(rows: list[dict]) -> str:
    base = next((r["tokens_per_s"] for r in rows if r["engine"] == "hf-compiled"), None)
    lines = ["| engine | tokens/s | MFU | peak memory (GiB) | vs hf-compiled | loss after N steps | runs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {r['engine']} | {r['tokens_per_s']:,.0f} | {mfu} | {memory} | {ratio} | "
                     f"{r['losses'][-1]:.4f} | {r['runs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smoke_defaults = {"steps": 4, "warmup": 1, "micro_batch": 2, "seq_len": 32}
    gpu_defaults = {"steps": 20, "warmup": 5, "micro_batch": 8, "seq_len": None}
    for key, value in (smoke_defaults if args.smoke else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seq_len is None:
        args.seq_len = load_config(args.config).train.seq_len
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    # DeepSpeed last: its engine keeps global state (hooks, communication buffers) after it is dropped
    engines = args.engines or (("hf-eager", "hf-compiled", "fsdp", *CUDA_EXTRAS, "deepspeed-zero2")
                               if device.type == "cuda" else REQUIRED)
    join_one_rank_group(device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    try:
        setup = make_setup(args, device)
        m, t = setup.cfg.model, setup.cfg.train
        print(f"{device_name(device)}: {m.n_layers} layers x {m.dim}, micro-batch {t.micro_batch_size} x "
              f"{t.seq_len} tokens, {t.dtype}, {args.steps} steps ({args.warmup} untimed)", flush=True)
        rows = []
        for name in engines:
            rows.append(measure(name, setup, args.warmup))
            r = rows[-1]
            print(f"  {name:16s} {r['tokens_per_s']:12,.0f} tokens/s  loss {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}", flush=True)
    finally:
        dist.destroy_process_group()

    env = {"device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "versions": versions(), "command": "python bench/train_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "model": setup.cfg.model.model_dump(),
        "micro_batch_size": setup.cfg.train.micro_batch_size, "seq_len": setup.cfg.train.seq_len,
        "dtype": setup.cfg.train.dtype, "steps": args.steps, "warmup": args.warmup,
        "compile_backend": setup.compile_backend}
    out = args.out or (Path(tempfile.gettempdir()) / "train_throughput-smoke.md" if args.smoke
                       else ROOT / "bench" / "results" / "train_throughput.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    v = env["versions"]
    method = "\n\n".join(__doc__.split("\n\n")[2:3])
    out.write_text(f"# Training throughput: HF transformers against Flotilla's engines\n\n"
                   f"- device: {env['device']}\n- date: {env['date']}\n- torch {v['torch']} (CUDA {v['cuda']}), "
                   f"transformers {v['transformers']}, deepspeed {v['deepspeed']}, triton {v['triton']}, python "
                   f"{v['python']}\n- command: {env['command']}\n- {m.n_layers} layers x {m.dim} ({m.n_heads} heads, "
                   f"{m.kv_heads} kv heads, MLP {m.hidden_dim}, vocabulary {m.vocab_size}), micro-batch "
                   f"{t.micro_batch_size} x {t.seq_len}, {t.dtype}, {args.steps} steps ({args.warmup} untimed)\n\n"
                   f"{method}\n\n{text}\n")
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(f"\nwrote {out} and {out.with_suffix('.json').name}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
