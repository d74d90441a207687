"""Our kernels against their baselines, measured side by side in one run.

    python bench/kernels.py            # on a GPU: the full sizes below, about 5 minutes on an H100
    python bench/kernels.py --smoke    # anywhere: tiny sizes (CPU: Triton's interpreter), checks nothing crashes

What is compared (ratios are what to read: absolute numbers drift between machines and runs):
- attention forward+backward, ours vs SDPA's flash backend: head dim 128 and 64, causal and not, S = 1k..16k
  at 16k tokens a batch, 2048 model width; TFLOP/s with FLOPs = 3.5 x 4*B*S*S*H*D, halved when causal
  (forward 1 + backward 2.5 matmul-equivalents);
- packed documents (log-normal lengths, mean about 660, in rows of 8192): ours (varlen) vs FlexAttention with a
  document mask, and vs SDPA causal over whole rows (what ignoring documents costs); useful TFLOP/s counts
  each document's own causal FLOPs only;
- FusedAdamW vs torch.optim.AdamW(fused=True) on Llama-3.2-1B's 1.24B float32 parameters: effective TB/s from
  28 bytes a parameter (read p, g, m, v; write p, m, v), 20 with bf16 moments, +4 for the clipping norm pass;
- fused linear + cross-entropy at vocabulary 128256 vs logits + F.cross_entropy: time and peak memory;
- RMSNorm, RoPE, SwiGLU (forward+backward) vs torch.compile of the same PyTorch code, in GB/s of the bytes
  each must move.
Timing: triton.testing.do_bench (CUDA events, median, L2 flushed between runs) after explicit warm-up calls
(so torch.compile's first call is not timed). The table is printed last and written to bench/results/.
Ours is always the Triton kernel (forced, as FLOTILLA_KERNELS=triton would: `auto` runs only verified kernels),
and a kernel's rows here, with tests/gpu, are what kernels/verified.py records for the GPU's compute capability.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; on a CPU through Triton's interpreter")
    parser.add_argument("--out", type=Path, help="where to write the markdown results (default: "
                        "bench/results/kernels.md; with --smoke, a temporary file)")
    return parser.parse_args()


# bench/gpu_suite.py imports this module for its benchmarks (and sets SMOKE itself): parse only when run
ARGS = parse_args() if __name__ == "__main__" else argparse.Namespace(smoke=False, out=None)
if ARGS.smoke:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels is imported: kernels are interpreted
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

import kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = ARGS.smoke
BF16 = torch.bfloat16


def compile_fn(fn):
    """torch.compile on the GPU; in the CPU smoke run the eager function (compiling there only costs time)."""
    return fn if SMOKE else torch.compile(fn)


def measure_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn() after three warm-up calls."""
    for _ in range(3):
        fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn, grad_to_none) -> float:
    """Peak memory fn() allocates beyond what was held before it, gradients included (CUDA only; nan elsewhere)."""
    if DEVICE.type != "cuda":
        return math.nan
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|: ours against the baseline, a sanity check that both computed the same thing."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


ROWS: list[dict] = []
METHOD = "\n\n".join(__doc__.split("\n\n")[2:4])  # what is compared, and how it is timed


def record(bench, case, ours_ms, baseline, base_ms, metric_unit="", ours_metric=math.nan, base_metric=math.nan,
           check=math.nan, extra=""):
    ROWS.append(dict(bench=bench, case=case, ours_ms=ours_ms, baseline=baseline, base_ms=base_ms,
                     speedup=base_ms / ours_ms, unit=metric_unit, ours_metric=ours_metric, base_metric=base_metric,
                     check=check, extra=extra))
    print(f"  {bench:10s} {case:34s} ours {ours_ms:9.3f} ms  {baseline} {base_ms:9.3f} ms", flush=True)


# --- attention ------------------------------------------------------------------------------------------------

def attention_flops(batch, seq, heads, head_dim, causal):
    return 3.5 * 4 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0)


def bench_attention():
    head_dims = (32,) if SMOKE else (128, 64)
    seqs = (64, 96) if SMOKE else (1024, 2048, 4096, 8192, 16384)
    tokens, width = (128, 128) if SMOKE else (16384, 2048)
    cases = [(head_dim, causal, seq, 1) for head_dim in head_dims for causal in (True, False) for seq in seqs]
    cases.append((head_dims[0], True, seqs[len(seqs) // 2], 4))  # grouped-query: 4 query heads per kv head
    for head_dim, causal, seq, group in cases:
        heads = width // head_dim
        batch = max(1, tokens // seq)
        q = torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=BF16, requires_grad=True)
        k, v = (torch.randn(batch, seq, heads // group, head_dim, device=DEVICE, dtype=BF16, requires_grad=True)
                for _ in range(2))
        dout = torch.randn_like(q)
        # SDPA gets its own layout, (B, H, S, D) contiguous, so it pays for no transposes
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

        def ours():
            kernels.flash_attn(q, k, v, causal=causal).backward(dout)

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=group > 1).backward(
                    dout.transpose(1, 2))

        check = rel_diff(kernels.flash_attn(q, k, v, causal=causal),
                         F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                        enable_gqa=group > 1).transpose(1, 2))
        t_ours = measure_ms(ours, [q, k, v])
        t_sdpa = measure_ms(sdpa, [qt, kt, vt])
        flops = attention_flops(batch, seq, heads, head_dim, causal)
        gqa = f" Hkv={heads // group}" if group > 1 else ""
        record("attention", f"d={head_dim} {'causal' if causal else 'full'} S={seq} B={batch} H={heads}{gqa}",
               t_ours, "SDPA flash", t_sdpa, "TFLOP/s", flops / t_ours / 1e9, flops / t_sdpa / 1e9, check)
        del q, k, v, qt, kt, vt, dout


def document_lengths(rows, row_len, log_median, generator):
    """Log-normal document lengths (sigma 1: mean = 1.65 x median), cut to fill `rows` rows exactly."""
    lengths = []
    for _ in range(rows):
        left = row_len
        while left:
            n = int(torch.empty(()).log_normal_(log_median, 1.0, generator=generator).clamp(1, row_len).item())
            n = min(n, left)
            lengths.append(n)
            left -= n
    return lengths


def bench_packed_documents():
    # median e^6 = 403 tokens (mean ~660): about 25 documents in 2 x 8192, as in DESIGN.md's anchor
    rows, row_len, heads, head_dim, log_median = (2, 128, 2, 64, 3.0) if SMOKE else (2, 8192, 16, 128, 6.0)
    lengths = document_lengths(rows, row_len, log_median, torch.Generator().manual_seed(0))
    total = rows * row_len
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(total, heads, head_dim, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, total, total, device=DEVICE)
    flex = compile_fn(flex_attention)
    qf, kf, vf = (t.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.detach().view(rows, row_len, heads, head_dim).transpose(1, 2).contiguous().requires_grad_()
                  for t in (q, k, v))

    def ours():
        kernels.flash_attn_varlen(q, k, v, cu_seqlens, max(lengths)).backward(dout)

    def flex_doc():
        flex(qf, kf, vf, block_mask=block_mask).backward(dout.transpose(0, 1).unsqueeze(0))

    def sdpa_rows():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qr, kr, vr, is_causal=True).backward(
                dout.view(rows, row_len, heads, head_dim).transpose(1, 2))

    dense_mask = (doc[:, None] == doc[None, :]).tril()

    def sdpa_dense_mask():  # the CPU stand-in for FlexAttention, which has no CPU backward
        F.scaled_dot_product_attention(qf, kf, vf, attn_mask=dense_mask).backward(dout.transpose(0, 1).unsqueeze(0))

    check = rel_diff(kernels.flash_attn_varlen(q, k, v, cu_seqlens, max(lengths)),
                     flex(qf.detach(), kf.detach(), vf.detach(), block_mask=block_mask)[0].transpose(0, 1))
    baselines = [("FlexAttention doc mask", flex_doc, [qf, kf, vf])] if DEVICE.type == "cuda" else [
        ("SDPA dense doc mask (CPU)", sdpa_dense_mask, [qf, kf, vf])]
    useful = sum(attention_flops(1, n, heads, head_dim, True) for n in lengths)
    t_ours = measure_ms(ours, [q, k, v])
    case = f"{len(lengths)} docs in {rows}x{row_len} H={heads} d={head_dim}"
    for name, fn, leaves in baselines + [("SDPA causal, docs ignored", sdpa_rows, [qr, kr, vr])]:
        t_base = measure_ms(fn, leaves)
        record("packed", case, t_ours, name, t_base, "useful TFLOP/s", useful / t_ours / 1e9, useful / t_base / 1e9,
               check if "doc mask" in name else math.nan)


# --- FusedAdamW -----------------------------------------------------------------------------------------------

def llama_1b_shapes():
    """Llama-3.2-1B: width 2048, 16 layers, 32 query / 8 kv heads of 64, MLP 8192, vocabulary 128256, tied
    embeddings: 1.236B parameters."""
    layer = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192),
             (2048,), (2048,)]
    return [(128256, 2048)] + layer * 16 + [(2048,)]


def bench_adamw():
    shapes = [(300, 64), (64,), (1000,)] * 3 if SMOKE else llama_1b_shapes()
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    case = f"{n / 1e6:,.1f}M fp32 params, {len(params)} tensors"

    def tbps(bytes_per_param, ms):
        return bytes_per_param * n / ms / 1e9

    torch_fused = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    t_torch = measure_ms(torch_fused.step)

    def torch_clipped():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        torch_fused.step()

    t_torch_clip = measure_ms(torch_clipped)
    del torch_fused, torch_clipped  # frees torch's 8 B/param of state before ours is built
    for label, moments, clip, nbytes, base_ms, base_bytes, baseline in (
            ("fp32 moments", torch.float32, None, 28, t_torch, 28, "torch fused AdamW"),
            ("bf16 moments", torch.bfloat16, None, 20, t_torch, 28, "torch fused AdamW"),
            ("fp32 moments + clip", torch.float32, 1.0, 32, t_torch_clip, 32, "clip_grad_norm_ + torch fused")):
        ours = kernels.FusedAdamW(params, lr=1e-4, weight_decay=0.1, max_grad_norm=clip, moments_dtype=moments)
        t_ours = measure_ms(ours.step)
        record("adamw", f"{case}, {label}", t_ours, baseline, base_ms, "TB/s effective", tbps(nbytes, t_ours),
               tbps(base_bytes, base_ms), extra=f"{nbytes} vs {base_bytes} B/param")
        del ours
    del params


# --- fused linear + cross-entropy -----------------------------------------------------------------------------

def bench_cross_entropy():
    tokens, width, vocab = (64, 32, 500) if SMOKE else (8192, 2048, 128256)
    hidden = torch.randn(tokens, width, device=DEVICE, dtype=BF16, requires_grad=True)
    weight = (torch.randn(vocab, width, device=DEVICE) / width**0.5).to(BF16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=DEVICE)

    def ours():
        kernels.fused_linear_cross_entropy(hidden, weight, targets).backward()

    def unfused():
        F.cross_entropy((hidden @ weight.t()).float(), targets).backward()

    check = rel_diff(kernels.fused_linear_cross_entropy(hidden, weight, targets),
                     F.cross_entropy((hidden @ weight.t()).float(), targets))
    mem_ours, mem_base = peak_mib(ours, [hidden, weight]), peak_mib(unfused, [hidden, weight])
    t_ours, t_base = measure_ms(ours, [hidden, weight]), measure_ms(unfused, [hidden, weight])
    record("linear+CE", f"N={tokens} H={width} V={vocab} bf16", t_ours, "logits + F.cross_entropy", t_base,
           "peak MiB", mem_ours, mem_base, check)


# --- RMSNorm, RoPE, SwiGLU ------------------------------------------------------------------------------------

def rms_norm_eager(x, weight, eps=1e-6):  # trainers.model.RMSNorm's forward
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_eager(x, cos, sin):  # trainers.model.apply_rotary
    xf = x.float()
    half = x.shape[-1] // 2
    return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), dim=-1) * sin).type_as(x)


def swiglu_eager(gate, up):
    return F.silu(gate) * up


def bench_elementwise():
    tokens, width, batch, seq, heads, head_dim, mlp = ((64, 96, 2, 16, 4, 32, 256) if SMOKE
                                                      else (16384, 2048, 4, 4096, 32, 128, 8192))
    x = torch.randn(tokens, width, device=DEVICE, dtype=BF16, requires_grad=True)
    w = torch.randn(width, device=DEVICE, dtype=BF16, requires_grad=True)
    q = torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=BF16, requires_grad=True)
    angles = torch.rand(batch, seq, 1, head_dim // 2, device=DEVICE) * 100
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    gate, up = (torch.randn(tokens, mlp, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(2))
    cases = [
        # name, ours, eager PyTorch, inputs, leaves, bytes moved forward+backward
        ("RMSNorm", kernels.rms_norm, rms_norm_eager, (x, w), (x, w), 5 * x.numel() * 2),
        ("RoPE", kernels.rope, rope_eager, (q, cos, sin), (q,), 4 * q.numel() * 2 + 4 * cos.numel() * 4),
        ("SwiGLU", kernels.swiglu, swiglu_eager, (gate, up), (gate, up), 8 * gate.numel() * 2),
    ]
    for name, ours_fn, eager_fn, inputs, leaves, nbytes in cases:
        compiled = compile_fn(eager_fn)
        dout = torch.randn_like(eager_fn(*inputs))
        check = rel_diff(ours_fn(*inputs), eager_fn(*inputs))
        t_ours = measure_ms(lambda: ours_fn(*inputs).backward(dout), list(leaves))
        t_base = measure_ms(lambda: compiled(*inputs).backward(dout), list(leaves))
        shape = "x".join(map(str, inputs[0].shape))
        record(name, f"{shape} bf16 fwd+bwd", t_ours, "torch.compile" if not SMOKE else "torch eager", t_base,
               "GB/s", nbytes / t_ours / 1e6, nbytes / t_base / 1e6, check)


# --- report ---------------------------------------------------------------------------------------------------

def table() -> str:
    head = ("| benchmark | case | ours ms | baseline | baseline ms | speedup | metric | ours | baseline | "
            "max rel diff |")
    lines = [head, "|" + "---|" * 10]
    for r in ROWS:
        check = "" if math.isnan(r["check"]) else f"{r['check']:.1e}"
        unit = r["unit"] + (f" ({r['extra']})" if r["extra"] else "")
        lines.append(f"| {r['bench']} | {r['case']} | {r['ours_ms']:.3f} | {r['baseline']} | {r['base_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {unit} | {r['ours_metric']:.4g} | {r['base_metric']:.4g} | {check} |")
    return "\n".join(lines)


def environment() -> str:
    if DEVICE.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}, sm_{major}{minor})"
    else:
        device = f"CPU ({platform.processor() or 'unknown'})"
    mode = "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled Triton"
    return (f"- device: {device}, {mode}{', smoke sizes' if SMOKE else ''}\n"
            f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n"
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"python {platform.python_version()}")


def main():
    torch.manual_seed(0)
    print(f"benchmarking on {DEVICE}{' (smoke)' if SMOKE else ''}", flush=True)
    for bench in (bench_attention, bench_packed_documents, bench_adamw, bench_cross_entropy, bench_elementwise):
        with kernels.force_implementation("triton"):  # ours is the kernel, verified or not
            bench()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    with kernels.force_implementation("triton"):
        choices = {k: kernels.choose(k, DEVICE) for k in kernels.KERNELS}
    for kernel, (impl, why) in choices.items():  # TRITON_INTERPRET=1 on a GPU machine, or no Triton
        if impl != "triton":
            print(f"note: {kernel} ran its PyTorch fallback ({why}); its rows compare PyTorch with PyTorch")
    out = ARGS.out or (Path(tempfile.gettempdir()) / "kernels-smoke.md" if SMOKE
                       else ROOT / "bench" / "results" / "kernels.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table()
    out.write_text(f"# Kernel benchmarks\n\n{environment()}\n- command: python bench/kernels.py "
                   f"{' '.join(sys.argv[1:])}\n\nspeedup = baseline ms / ours ms. {METHOD}\n\n{text}\n")
    print(f"\nwrote {out}\n{environment()}\n")
    print(text)


if __name__ == "__main__":
    main()
