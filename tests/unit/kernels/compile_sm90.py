"""Compile every kernel as its launcher would launch it on an H100 (sm_90), without a GPU, and report
registers, spills and shared memory; `python -m tests.unit.kernels.compile_sm90` prints the table.

Run without TRITON_INTERPRET, so the launchers pick their GPU tile sizes. Each launcher runs on CPU tensors
with its kernels swapped for recorders that keep the (grid, arguments, options) of the launch instead of
launching; each recorded launch is then compiled ahead of time for sm_90 with Triton's own compiler and
ptxas (both ship in the Triton wheel). This catches what the interpreter cannot: code that does not compile
for the GPU, tiles that do not fit in shared memory, and register spills.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64"}


class _Recorder:
    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.name, self.kernel, args, kwargs))
        return record


def _record_launches() -> list:
    """Run each launcher at a realistic size, recording its kernel launches."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: GPU tile sizes wanted"
    launches: list = []
    modules = {m: importlib.import_module(f"kernels.{m}")
               for m in ("attention", "adamw", "rmsnorm", "rope", "swiglu", "cross_entropy")}
    for module in modules.values():
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _Recorder(name, getattr(module, name), launches))
    # rms_norm's backward sizes its grid by the SM count: an H100 SXM has 132
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=132)

    attention = modules["attention"]
    bf16 = torch.bfloat16
    for head_dim in (64, 128):
        q = torch.empty(4096, 32, head_dim, dtype=bf16)
        k = torch.empty(4096, 8, head_dim, dtype=bf16)
        cu = torch.tensor([0, 1000, 4096], dtype=torch.int32)
        for causal in (True, False):
            o, lse = attention._flash_attn_varlen_fwd(q, k, k, cu, 3096, causal, 0.1)
            attention._flash_attn_varlen_bwd(q, q, k, k, q, lse, cu, 3096, causal, 0.1)

    adamw = modules["adamw"]
    for param_dtype, moments_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                       (torch.bfloat16, torch.float32)):
        params = [torch.zeros(5000, dtype=param_dtype, requires_grad=True) for _ in range(2)]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = adamw.FusedAdamW(params, max_grad_norm=1.0, moments_dtype=moments_dtype)
        for bucket in opt._buckets().values():
            opt._launch_norm(bucket)
            opt._update_triton(bucket, torch.ones(()), seed=1)

    x = torch.empty(16, 4096, dtype=bf16)
    w = torch.empty(4096, dtype=bf16)
    y, x2, rstd = modules["rmsnorm"]._rms_norm_fwd(x, w, 1e-6)
    modules["rmsnorm"]._rms_norm_bwd(x, x2, w, torch.empty(16))
    rope = modules["rope"]
    rope._launch(rope._rope_fwd_kernel, torch.empty(16, 32, 128, dtype=bf16), torch.empty(16, 128),
                 torch.empty(16, 128))
    rope._launch(rope._rope_bwd_kernel, torch.empty(16, 32, 128, dtype=bf16), torch.empty(16, 128),
                 torch.empty(16, 128))
    swiglu = modules["swiglu"]
    gate = torch.empty(4096, dtype=bf16)
    swiglu.SwiGLUFunction.forward(SimpleNamespace(save_for_backward=lambda *t: None), gate, gate)
    swiglu.SwiGLUFunction.backward(SimpleNamespace(saved_tensors=(gate, gate)), gate)
    ce = modules["cross_entropy"]
    logits, targets = torch.empty(8, 128256, dtype=bf16), torch.zeros(8, dtype=torch.int64)
    _, lse = ce._ce_rows_fwd(logits, targets, -100, use_triton=True)
    ce._ce_rows_bwd_(logits, targets, torch.empty(8), torch.ones(()), -100, use_triton=True)
    return launches


def _signature(kernel, args, kwargs):
    import triton.language as tl

    constexprs, signature, attrs = {}, {}, {}
    positional = iter(args)
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            constexprs[name] = kwargs[name]
            signature[name] = "constexpr"
            continue
        value = kwargs[name] if name in kwargs else next(positional)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, tl.dtype):
            raise TypeError(f"{name}: a dtype must be a constexpr")
        else:
            raise TypeError(f"{name}: cannot type {type(value).__name__}")
    return signature, constexprs, attrs


def compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results, seen = [], set()
    for name, kernel, args, kwargs in _record_launches():
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        signature, constexprs, attrs = _signature(kernel, args, kwargs)
        key = (name, json.dumps({k: str(v) for k, v in {**signature, **constexprs, **options}.items()}))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        results.append(dict(kernel=name, config={k: str(v) for k, v in {**constexprs, **options}.items()},
                            registers=int(match.group(1)), spill_bytes=int(match.group(2)),
                            shared_bytes=compiled.metadata.shared))
    return results


if __name__ == "__main__":
    rows = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['kernel']:36s} regs {r['registers']:3d}  spill {r['spill_bytes']:4d} B  "
                  f"smem {r['shared_bytes'] // 1024:3d} KiB  {r['config']}")
