"""Fused SwiGLU activation: y = silu(gate) * up, elementwise, float32 inside.

The backward recomputes sigmoid(gate) instead of storing it (one more exp, no extra tensor):
  d_up = dy * silu(gate),   d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import INTERPRET, dispatch, tl, triton

# 1024 elements over 4 warps: 8 per thread, two 128-bit accesses of bf16 — enough in flight for a
# bandwidth-bound elementwise kernel (Liger-Kernel's SwiGLU tiles similarly).
BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DUP + offs, (dy * silu).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)


def _launch_config(n: int) -> tuple[tuple[int], int]:
    return (triton.cdiv(n, BLOCK),), (1 if INTERPRET else 4)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        grid, warps = _launch_config(gate.numel())
        _swiglu_fwd_kernel[grid](gate, up, y, gate.numel(), BLOCK=BLOCK, num_warps=warps)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        grid, warps = _launch_config(gate.numel())
        _swiglu_bwd_kernel[grid](dy, gate, up, dgate, dup, gate.numel(), BLOCK=BLOCK, num_warps=warps)
        return dgate, dup


def swiglu_torch(gate: Tensor, up: Tensor) -> Tensor:
    """The PyTorch fallback, float32 inside like the kernel."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up. gate, up: one shape, one floating dtype, one device. Returns that shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"swiglu: gate and up must match in shape, dtype and device; got {tuple(gate.shape)} "
                         f"{gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if not gate.is_floating_point():
        raise ValueError(f"swiglu: inputs must be floating point; got {gate.dtype}")
    if gate.numel() == 0 or dispatch("swiglu", gate.device) == "torch":
        return swiglu_torch(gate, up)
    return SwiGLUFunction.apply(gate, up)
