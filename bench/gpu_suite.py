"""Everything the GPU machine is for, as one command that fits its time: correctness, kernels, training
throughput, a real `flotilla train`, and the adaptive SP profile, each stage writing its results as it gets them.

On the GPU machine (../shared/GPU.md; build .whl/ here first with ../shared/tools/device-wheels.sh and send it
with the tree), from the repository root, one line:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 MLFLOW_ALLOW_FILE_STORE=true RAY_AUTH_MODE=disabled && python3 bench/gpu_suite.py --out "${OUT:-bench/results}/gpu"

Anywhere else:

    python bench/gpu_suite.py --smoke --out /tmp/suite      # every stage at tiny sizes on a CPU, seconds each
    python bench/gpu_suite.py --stages kernels training     # some stages only

Stages, in order, each in a process of its own killed at its budget (seconds; 470 in all, under 8 minutes on
one H100 with start-up), so that one stage's hang, crash or CUDA state cannot take the others with it:

- correctness, 100 s: tests/gpu (the Triton kernels, forced; PyTorch's CUDA attention paths, tests/gpu/
  test_attention_gpu.py: SDPA flash, varlen_attn, FlexAttention, FA3 where torch activates it, flash varlen with
  dropout, against float64 on causal rows and long-tail packed documents) and tests/unit/kernels (forced Triton);
- kernels, 120 s: device copy bandwidth; attention forward+backward (d 64/128, causal, 1k-16k; long-tail packed
  documents in 2 x 8192 and 1 x 16384) for SDPA flash, FA3, varlen_attn, FlexAttention, ours, and what CUDA ran
  before (a dense document mask, a per-document loop); FusedAdamW against torch fused on 1.24B parameters and
  the 28 B/param floor at copy bandwidth; linear+CE, RMSNorm, RoPE, SwiGLU against PyTorch and torch.compile
  (bench/kernels.py's benchmarks);
- training, 130 s: configs/llama-1b.yaml trained by HF eager, Flotilla's fsdp engine, HF + torch.compile and the
  deepspeed engine (ZeRO-2) from the same weights on the same batches: tokens/s, MFU, peak memory, loss
  agreement (bench/train_throughput.py's engines and measurement);
- flotilla-train, 75 s: `flotilla train configs/llama-1b.yaml`'s own path (a Ray Train worker on the GPU, an
  MLflow run), 20 steps: logged tokens/s against the training stage's bare fsdp engine, and the plan's memory
  estimate against the measured peak;
- sp-profile, 45 s: the adaptive SP cost model profiled on one GPU (packed micro-batches of 256 to 32k tokens,
  llama-1b's width, 4 layers): a1, a2, b and the fit's error.

Each stage writes <out>/<stage>.md and <stage>.json (device, date, versions, command) after every row it
measures, so a run cut short keeps what it finished; a stage that runs out of its budget says so in its file.
<out>/suite.md lists the stages: done, cut short, failed or skipped, and their seconds. --smoke runs every stage
at tiny sizes on a CPU (Ray and MLflow included), where "ours" are the kernels' PyTorch fallbacks (Triton's
interpreter would take minutes) and the numbers check the plumbing only.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as `python bench/gpu_suite.py`, sys.path[0] is bench/, where kernels.py would shadow the kernels package
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

TOTAL_BUDGET_S = 470
DEADLINE_ENV = "FLOTILLA_SUITE_DEADLINE"
"""The time.time() at which the running stage is killed: a stage skips what would not finish before it."""


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    smoke_budget_s: int


STAGES = (Stage("correctness", 100, 60), Stage("kernels", 120, 60), Stage("training", 130, 90),
          Stage("flotilla-train", 75, 120), Stage("sp-profile", 45, 60))


def time_left() -> float:
    return float(os.environ.get(DEADLINE_ENV, math.inf)) - time.time()


# --- results ---------------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """Installed versions, read from the package metadata (importing DeepSpeed or Ray here would cost seconds)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "deepspeed", "ray", "mlflow-skinny", "mlflow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def environment(smoke: bool) -> dict:
    import torch

    from trainers.attention import torch_features

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    features = torch_features()
    try:
        from torch.nn.attention import list_flash_attention_impls
        flash_impls = list_flash_attention_impls()
    except ImportError:
        flash_impls = []
    return {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {**versions(), "cuda": str(torch.version.cuda)}, "smoke": smoke,
            "command": "python bench/gpu_suite.py " + " ".join(sys.argv[1:]),
            "torch attention": {"varlen_attn": features.varlen is not None, "flex_attention": features.flex,
                                "flash implementations torch registers": flash_impls,
                                "FA3 activatable": features.fa3}}


class Report:
    """One stage's results, <out>/<stage>.md and .json, written again after every row and note."""

    def __init__(self, out: Path, stage: str, title: str, method: str, smoke: bool):
        self.md, self.json = out / f"{stage}.md", out / f"{stage}.json"
        self.stage, self.title, self.method = stage, title, method
        self.env, self.rows, self.notes = environment(smoke), [], []
        self.write()

    def add(self, **row) -> None:
        self.rows.append(row)
        print(f"  {self.stage}: " + ", ".join(f"{k} {_cell(v)}" for k, v in row.items()), flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {self.stage}: {text}", flush=True)
        self.write()

    def write(self) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        v = self.env["versions"]
        lines = [f"# {self.title}", "", f"- device: {self.env['device']}", f"- date: {self.env['date']}",
                 "- " + ", ".join(f"{k} {val}" for k, val in v.items()), f"- command: {self.env['command']}",
                 f"- torch attention: {json.dumps(self.env['torch attention'])}", "", self.method, ""]
        if columns:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        self.md.write_text("\n".join(lines).rstrip() + "\n")
        self.json.write_text(json.dumps({"stage": self.stage, "environment": self.env, "rows": self.rows,
                                         "notes": self.notes}, indent=1, default=str))


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


# --- stage 1: correctness --------------------------------------------------------------------------------------

def stage_correctness(out: Path, smoke: bool) -> None:
    report = Report(out, "correctness", "Correctness on the GPU: kernels and CUDA attention paths against float64",
                    "pytest in a subprocess each; tests/gpu and tests/unit/kernels force the Triton kernels "
                    "themselves (their conftest.py). tests/gpu/test_attention_gpu.py checks the PyTorch kernels "
                    "trainers.attention picks on CUDA.", smoke)
    suites = [("tests/gpu", ["-m", "gpu", "tests/gpu"]), ("tests/unit/kernels", ["tests/unit/kernels"])]
    if smoke:  # on a CPU the GPU tests skip (collected: they import), the interpreted kernel tests take minutes
        suites = suites[:1]
    for name, args in suites:
        if time_left() < 15:
            report.note(f"{name}: not run, {time_left():.0f} s left")
            continue
        started = time.perf_counter()
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", *args]
        try:
            output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                    timeout=max(5.0, time_left() - 5)).stdout
            finished = True
        except subprocess.TimeoutExpired as err:  # what it printed so far still counts
            output, finished = err.stdout or "", False
            output = output.decode() if isinstance(output, bytes) else output
        outcomes = _pytest_outcomes(output)
        failing = [test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
        report.add(suite=name, passed=sum(o == "PASSED" for o in outcomes.values()), failed=len(failing),
                   skipped=sum(o == "SKIPPED" for o in outcomes.values()),
                   seconds=round(time.perf_counter() - started, 1), finished="yes" if finished else "cut short",
                   failing=", ".join(failing[:8]) or ("" if outcomes else output[-600:]))


def _pytest_outcomes(verbose_output: str) -> dict[str, str]:
    """test id -> PASSED / FAILED / SKIPPED / ERROR, from `pytest -v` lines ("path::test PASSED [ 10%]")."""
    line = re.compile(r"^\S+?::(?P<test>.+?) (?P<outcome>PASSED|FAILED|SKIPPED|ERROR)\b", re.MULTILINE)
    return {m["test"]: m["outcome"] for m in line.finditer(verbose_output)}


# --- stage 2: kernels ------------------------------------------------------------------------------------------

def stage_kernels(out: Path, smoke: bool) -> None:
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported, as bench/kernels.py does
    import warnings

    import bench.kernels as bk
    import kernels
    from trainers.attention import (FA3, FLASH, FLEX, SDPA, SDPA_MASK, SDPA_PER_DOCUMENT, VARLEN, attention_by,
                                    torch_features)

    bk.SMOKE = smoke
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    report = Report(out, "kernels", "Kernels: PyTorch's attention kernels, ours, and the rest of the block",
                    "Forward+backward after warm-up (bench/kernels.py's measure_ms: CUDA events, median). Attention "
                    "TFLOP/s = 3.5 x 4BSSHD/2 (causal); packed documents count each document's own causal FLOPs "
                    "(useful TFLOP/s). check: max |out - SDPA flash's| / max |SDPA flash's| (packed: against "
                    "varlen_attn). 'before' rows are what the CUDA default ran before issue 25: a dense document "
                    "mask for rows, a per-document loop for one packed row.", smoke)
    def ours():  # a fresh context each time: force_implementation's is single-use
        return kernels.force_implementation("triton" if on_gpu else "torch")

    if not on_gpu:
        report.note("on a CPU 'ours' runs the kernels' PyTorch fallbacks and attention runs forward only "
                    "(FlexAttention has no CPU backward): the plumbing, not the kernels")
    dtype = torch.bfloat16
    device = bk.DEVICE
    fa3 = on_gpu and torch_features().fa3 and torch.cuda.get_device_capability()[0] == 9

    if on_gpu:  # the ceiling the AdamW floor is measured against
        src = torch.empty(2**28, device=device)  # 1 GiB
        dst = torch.empty_like(src)
        ms = bk.measure_ms(lambda: dst.copy_(src))
        copy_tbps = 2 * src.numel() * 4 / ms / 1e9
        report.add(bench="copy", case="1 GiB device to device", impl="Tensor.copy_", ms=ms, metric="TB/s",
                   value=copy_tbps)
        del src, dst
    else:
        copy_tbps = math.nan

    def timed(fn, leaves, backward_of=None):
        """ms of fn() (+ backward with a fixed dout where the device allows it)."""
        if on_gpu:
            return bk.measure_ms(lambda: fn().backward(backward_of), leaves)
        with torch.no_grad():
            return bk.measure_ms(fn)

    width, tokens = (128, 256) if smoke else (2048, 16384)
    cases = [(32, 128)] if smoke else [(128, 1024), (128, 16384), (64, 4096)]
    # attention stops while this much of the stage is left: AdamW, linear+CE and the elementwise kernels need it
    reserve = 0 if smoke else 65
    for head_dim, seq in cases:
        heads, batch = width // head_dim, max(1, tokens // seq)
        q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=on_gpu)
        k, v = (torch.randn(batch, seq, heads // 4, head_dim, device=device, dtype=dtype, requires_grad=on_gpu)
                for _ in range(2))
        dout = torch.randn_like(q)
        rows_cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
        impls = ([FLASH] + ([FLASH + FA3] if fa3 else []) + [VARLEN, FLEX, "ours"]) if on_gpu else [SDPA, FLEX, "ours"]
        with torch.no_grad():
            reference = attention_by(FLASH if on_gpu else SDPA, q, k, v)
        for impl in impls:
            if time_left() < 20 + reserve:
                report.note(f"attention d={head_dim} S={seq} {impl}: not run, {time_left():.0f} s left")
                continue
            if impl == "ours":
                def fn():
                    with ours():
                        return kernels.flash_attn(q, k, v, causal=True)
            else:
                def fn(impl=impl):
                    return attention_by(impl, q, k, v, cu_seqlens=rows_cu, max_seqlen=seq)
            ms = timed(fn, [q, k, v], dout)
            with torch.no_grad():
                check = bk.rel_diff(fn(), reference)
            flops = bk.attention_flops(batch, seq, heads, head_dim, True) / (3.5 if not on_gpu else 1)
            report.add(bench="attention", case=f"d={head_dim} causal S={seq} B={batch} H={heads} Hkv={heads // 4}",
                       impl=impl, ms=ms, metric="TFLOP/s", value=flops / ms / 1e9, check=check)
        del q, k, v, dout

    # long-tail documents, median e^6 = 403 tokens, in 2 rows of 8192 (DESIGN.md's anchor) and in one row
    for rows in (2, 1):
        seq = 128 if smoke else (8192 if rows == 2 else 16384)
        heads, head_dim = (2, 32) if smoke else (16, 128)
        lengths = bk.document_lengths(rows, seq, 3.0 if smoke else 6.0, torch.Generator().manual_seed(0))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q = torch.randn(rows, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=on_gpu)
        k, v = (torch.randn(rows, seq, heads // 2, head_dim, device=device, dtype=dtype, requires_grad=on_gpu)
                for _ in range(2))
        dout = torch.randn_like(q)
        before = SDPA_MASK if rows > 1 else SDPA_PER_DOCUMENT
        impls = ([VARLEN] + ([VARLEN + FA3] if fa3 else []) + [FLEX, "ours", before, FLASH + " (docs ignored)"]
                 if on_gpu else [FLEX, before, SDPA + " (docs ignored)"])
        with torch.no_grad():
            reference = attention_by(VARLEN if on_gpu else before, q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
        useful = sum(bk.attention_flops(1, n, heads, head_dim, True) for n in lengths)
        for impl in impls:
            if time_left() < 20 + reserve:
                report.note(f"packed {rows}x{seq} {impl}: not run, {time_left():.0f} s left")
                continue
            ignored = impl.endswith(" (docs ignored)")
            if impl == "ours":
                def fn():
                    with ours():
                        flat = (t.reshape(rows * seq, *t.shape[2:]) for t in (q, k, v))
                        return kernels.flash_attn_varlen(*flat, cu, max(lengths)).view(q.shape)
            else:
                def fn(impl=impl.removesuffix(" (docs ignored)"), ignored=ignored):
                    return attention_by(impl, q, k, v, cu_seqlens=None if ignored else cu, max_seqlen=max(lengths))
            ms = timed(fn, [q, k, v], dout)
            with torch.no_grad():
                check = math.nan if ignored else bk.rel_diff(fn(), reference)
            label = impl + (" [before]" if impl == before else "")
            report.add(bench="packed", case=f"{len(lengths)} docs in {rows}x{seq} H={heads} Hkv={heads // 2} "
                       f"d={head_dim}", impl=label, ms=ms, metric="useful TFLOP/s",
                       value=useful / ms / 1e9 / (1 if on_gpu else 3.5), check=check)
        del q, k, v, dout

    for name, bench, needs in (("adamw", bk.bench_adamw, 60), ("linear+CE", bk.bench_cross_entropy, 20),
                               ("RMSNorm/RoPE/SwiGLU", bk.bench_elementwise, 40)):
        if time_left() < (5 if smoke else needs):
            report.note(f"{name}: not run, {time_left():.0f} s left (it needs about {needs} s)")
            continue
        first = len(bk.ROWS)
        with ours():
            bench()
        for r in bk.ROWS[first:]:
            row = dict(bench=r["bench"], case=r["case"], impl="ours", ms=r["ours_ms"], baseline=r["baseline"],
                       baseline_ms=r["base_ms"], speedup=r["speedup"], metric=r["unit"], value=r["ours_metric"],
                       baseline_value=r["base_metric"], check=r["check"])
            if r["bench"] == "adamw":  # the floor: the bytes each parameter must move, at copy bandwidth
                row["of copy bandwidth"] = r["ours_metric"] / copy_tbps
            report.add(**row)
        if on_gpu:
            torch.cuda.empty_cache()


# --- stage 3: training -----------------------------------------------------------------------------------------

def stage_training(out: Path, smoke: bool) -> None:
    import torch
    import torch.distributed as dist

    import bench.train_throughput as tt

    report = Report(out, "training", "Training configs/llama-1b.yaml: HF transformers against Flotilla's engines",
                    "bench/train_throughput.py's engines and measurement: same weights, batches, loss and "
                    "optimizer; untimed warm-up steps first. loss vs hf-eager: the largest relative difference "
                    "of the per-step losses (bf16: about 1e-2 expected). The config's micro-batch (4 x 2048), so "
                    "the flotilla-train stage compares with the fsdp row.", smoke)
    on_gpu = torch.cuda.is_available() and not smoke
    argv = ["--smoke", "--steps", "2"] if smoke else ["--steps", "12", "--warmup", "4", "--micro-batch", "4"]
    args = tt.parse_args(argv)
    defaults = {"steps": 4, "warmup": 1, "micro_batch": 2, "seq_len": 32} if smoke else {"seq_len": None}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seq_len is None:
        args.seq_len = tt.load_config(args.config).train.seq_len
    device = torch.device("cuda" if on_gpu else "cpu")
    # DeepSpeed last (its engine keeps global state); on a CPU smoke run the two quick ones: the bench's own
    # test (tests/unit/test_train_throughput.py) runs all four there
    engines = ("hf-eager", "fsdp", "hf-compiled", "deepspeed-zero2") if on_gpu else ("hf-eager", "fsdp")
    tt.join_one_rank_group(device)
    if on_gpu:
        torch.cuda.set_device(0)
    try:
        setup = tt.make_setup(args, device)
        reference = None
        for name in engines:
            if time_left() < (15 if smoke else 30):
                report.note(f"{name}: not run, {time_left():.0f} s left")
                continue
            started = time.perf_counter()
            row = tt.measure(name, setup, args.warmup)
            reference = reference or row["losses"]
            agreement = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], reference))
            report.add(engine=name, tokens_per_s=row["tokens_per_s"],
                       mfu="n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
                       peak_memory_gib=row["peak_memory_gib"] if row["peak_memory_gib"] is not None else "n/a",
                       loss_first=row["losses"][0], loss_last=row["losses"][-1], loss_vs_hf_eager=agreement,
                       seconds=round(time.perf_counter() - started, 1), runs=row["runs"],
                       micro_batch=args.micro_batch, seq_len=args.seq_len)
    finally:
        dist.destroy_process_group()


# --- stage 4: flotilla train -----------------------------------------------------------------------------------

def stage_flotilla_train(out: Path, smoke: bool) -> None:
    import statistics

    from orchestrator.config import load_config
    from orchestrator.launch import run_training
    from orchestrator.plan import make_plan

    report = Report(out, "flotilla-train", "`flotilla train configs/llama-1b.yaml` on the GPU: Ray Train and MLflow",
                    "orchestrator.launch.run_training, what `flotilla train` calls: an embedded Ray, one Ray Train "
                    "worker on the GPU, an MLflow run in a file store, 20 steps (the final checkpoint in a "
                    "temporary directory, no logged model). tokens/s: the median of the steps the worker logs "
                    "after the first 5; against the training stage's fsdp row (the bare trainer, same "
                    "micro-batch). Peak: the worker's torch.cuda.max_memory_allocated (memory_gb); plan: "
                    "`flotilla plan`'s total.", smoke)
    scratch = Path(tempfile.mkdtemp(prefix="flotilla-suite-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", (scratch / "mlruns").as_uri())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store unless allowed
    config_path, overrides = ROOT / "configs" / "llama-1b.yaml", ["train.steps=20", "train.log_every=5"]
    if smoke:
        config_path, overrides = ROOT / "configs" / "tiny.yaml", ["train.steps=3", "train.log_every=1",
                                                                   "train.val_every=0", "cluster.num_workers=1"]
    overrides += ["tracking.log_models=none", f"checkpoint.dir={scratch / 'runs'}", "tracking.experiment=gpu-suite"]
    config = load_config(config_path, overrides)
    plan = make_plan(config)
    started = time.perf_counter()
    outcome = run_training(config, run_name=f"gpu-suite-{datetime.datetime.now():%H%M%S}", quiet=True)
    shutil.rmtree(scratch / "runs", ignore_errors=True)  # the final checkpoint: 17 GB for llama-1b, not a result
    steps = [m for m in outcome.history if "tokens_per_s" in m]
    timed = [m["tokens_per_s"] for m in steps if m.get("step", 0) > 5] or [m["tokens_per_s"] for m in steps]
    logged = statistics.median(timed) if timed else math.nan
    bare = math.nan
    training = out / "training.json"
    if training.exists():
        bare = next((r["tokens_per_s"] for r in json.loads(training.read_text())["rows"] if r["engine"] == "fsdp"),
                    math.nan)
    peak = max((m["memory_gb"] for m in steps if "memory_gb" in m), default=math.nan) * 2**30
    report.add(config=str(config_path.relative_to(ROOT)), steps=len(steps), tokens_per_s=logged,
               bare_fsdp_tokens_per_s=bare, logged_vs_bare=logged / bare if bare else math.nan,
               plan_gib=plan.memory.total / 2**30, peak_gib=peak / 2**30, plan_vs_peak=plan.memory.total / peak,
               seconds=round(time.perf_counter() - started, 1), mlflow_run=outcome.mlflow_run_id)
    if smoke:
        report.note("smoke: memory_gb is the worker's resident set on a CPU, not an allocator peak, and the "
                    "training stage's smoke model is not configs/tiny.yaml's: plan_vs_peak and logged_vs_bare only "
                    "show the plumbing")


# --- stage 5: adaptive SP profile ------------------------------------------------------------------------------

def stage_sp_profile(out: Path, smoke: bool) -> None:
    import torch

    from orchestrator.config import load_config
    from orchestrator.profile_sp import default_lengths, fit_profile, profile_grids
    from trainers.config import TrainerConfig
    from trainers.parallel.adaptive.profile import measure
    from trainers.run import build

    report = Report(out, "sp-profile", "The adaptive SP cost model profiled on one GPU",
                    "`flotilla profile`'s measurement (trainers.parallel.adaptive.profile.measure: packed "
                    "micro-batches of several counts and lengths through the real trainer, forward and backward, "
                    "the least of 3 after a warm-up) and fit (orchestrator.profile_sp.fit_profile: time = b + "
                    "count (a1 s^2 + a2 s), least squares), in this process: one device needs no Ray. fit error: "
                    "|fitted - measured| / measured over the micro-batches.", smoke)
    on_gpu = torch.cuda.is_available() and not smoke
    max_len = 32768 if not smoke else 256
    overrides = ["model.n_layers=4", f"model.max_seq_len={max_len}", "data.batching=documents",
                 f"train.max_doc_len={max_len}", f"train.tokens_per_step={max_len}", "parallel.sp=1",
                 "parallel.dp_shard=1", "parallel.sp_mode=adaptive", "parallel.adaptive.cost_model=flexsp-7b",
                 "parallel.activation_checkpointing=true", "cluster.num_workers=1",
                 f"cluster.use_gpu={str(on_gpu).lower()}"]
    if smoke:
        overrides += ["train.seq_len=32", "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
                      "model.vocab_size=128", "model.ffn_dim=128", "train.dtype=float32", "data.synthetic_docs=200",
                      "data.synthetic_mean_len=64", "parallel.activation_checkpointing=false"]
    # cost_model=False: as `flotilla profile`, which makes the cost model the config would otherwise be checked
    # against (the built-in one only lets the trainer build)
    config = load_config(ROOT / "configs" / "llama-1b.yaml", overrides, cost_model=False)
    lengths = [n for n in default_lengths(max_len // 2 if smoke else max_len) if n >= (32 if smoke else 256)]
    grids = profile_grids(config, lengths)
    started = time.perf_counter()
    trainee = build(TrainerConfig.model_validate(config.trainer_sections()), use_gpu=on_gpu)
    measured = measure(trainee, grids)
    trainee.adaptive.close()
    fitted = fit_profile(config, measured)
    for degree, row in fitted.record["degrees"].items():
        for mb in row["micro_batches"]:
            a1, a2, b = row["a1_ms_per_token2"], row["a2_ms_per_token"], row["b_ms"]
            fit = b + mb["count"] * (a1 * mb["length"] ** 2 + a2 * mb["length"])
            report.add(degree=degree, count=mb["count"], length=mb["length"], measured_ms=mb["ms"], fitted_ms=fit,
                       error=abs(fit - mb["ms"]) / mb["ms"])
        report.note(f"degree {degree}: a1 {row['a1_ms_per_token2']:.3g} ms/token^2, a2 {row['a2_ms_per_token']:.3g} "
                    f"ms/token, b {row['b_ms']:.3g} ms; fit error median {row['fit_error']['median']:.1%}, largest "
                    f"{row['fit_error']['max']:.1%}; {time.perf_counter() - started:.0f} s")
    (out / "sp-profile-cost.json").write_text(fitted.cost.to_json() + "\n")


# --- the driver ------------------------------------------------------------------------------------------------

RUN = {"correctness": stage_correctness, "kernels": stage_kernels, "training": stage_training,
       "flotilla-train": stage_flotilla_train, "sp-profile": stage_sp_profile}


def run_stage(stage: Stage, out: Path, smoke: bool, budget: float) -> tuple[str, float]:
    """The stage in a process of its own, killed (with its children: Ray, compile workers) at its budget."""
    started = time.time()
    env = {**os.environ, DEADLINE_ENV: str(started + budget), "PYTHONUNBUFFERED": "1"}
    if smoke:  # tiny tensors: one thread each, no OpenMP teams contending for a small, shared CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--out", str(out)]
    process = subprocess.Popen(command + (["--smoke"] if smoke else []), cwd=ROOT, env=env, start_new_session=True)
    try:
        status = "done" if process.wait(timeout=budget) == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = f"cut short at its budget ({budget:.0f} s)"
    seconds = time.time() - started
    results = out / f"{stage.name}.md"
    if status != "done":
        with results.open("a") as f:
            f.write(f"\n**{status}**: the rows above are what it finished.\n")
    return status, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/gpu; --smoke: a temporary "
                        "folder)")
    parser.add_argument("--smoke", action="store_true", help="every stage at tiny sizes, on a CPU")
    parser.add_argument("--stages", nargs="+", choices=list(RUN), help="default: all, in order")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole suite")
    parser.add_argument("--stage", choices=list(RUN), help=argparse.SUPPRESS)  # one stage, in its own process
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-suite-")) if args.smoke else ROOT / "bench/results/gpu")
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        RUN[args.stage](out, args.smoke)
        return 0

    deadline = time.time() + args.budget
    lines = ["| stage | status | seconds | budget |", "|---|---|---|---|"]
    for stage in STAGES:
        if args.stages and stage.name not in args.stages:
            continue
        budget = min(stage.smoke_budget_s if args.smoke else stage.budget_s, deadline - time.time())
        if budget < 10:
            status, seconds = f"skipped: {max(0.0, deadline - time.time()):.0f} s of the suite left", 0.0
        else:
            print(f"== {stage.name} (at most {budget:.0f} s)", flush=True)
            status, seconds = run_stage(stage, out, args.smoke, budget)
        planned = stage.smoke_budget_s if args.smoke else stage.budget_s
        lines.append(f"| {stage.name} | {status} | {seconds:.0f} | {planned} |")
        (out / "suite.md").write_text("# GPU suite\n\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {out}\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
