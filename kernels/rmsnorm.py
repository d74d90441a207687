"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, one pass over each row, float32 inside.

The forward keeps 1/rms per row (4 bytes a row) for the backward, which recomputes x_hat = x * rstd:
  dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat)),   dw = sum over rows of dy * x_hat.
dw is summed in two steps, as in Liger-Kernel: each backward program walks a contiguous range of rows and
keeps a float32 partial sum, and the (programs, N) partials are added once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import INTERPRET, dispatch, tl, triton

# One row must fit one tile; 64k columns is far past any model width.
MAX_COLS = 65536


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                         rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        r = tl.cast(row, tl.int64)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        x_hat = x * rstd
        wdy = w * dy
        dx = (wdy - x_hat * (tl.sum(wdy * x_hat, 0) / n_cols)) * rstd
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): one row per tile; warps grow with the row so each thread holds <= ~16 values
    (Liger-Kernel's calculate_settings thresholds)."""
    block = triton.next_power_of_2(n_cols)
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, (1 if INTERPRET else warps)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., N), weight (N,) -> y (..., N) in x's dtype, x as (rows, N), rstd (rows,) float32."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, warps = _config(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                    BLOCK=block, num_warps=warps)
    return y.view(x.shape), x2, rstd


def _rms_norm_bwd(dy: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    dy2 = _rows(dy)
    n_rows, n_cols = x2.shape
    # One program per SM on the GPU (each then sums many rows into its dw partial); in the interpreter, a few.
    programs = 4 if INTERPRET else torch.cuda.get_device_properties(x2.device).multi_processor_count
    programs = max(1, min(programs, n_rows))
    rows_per_program = triton.cdiv(n_rows, programs)
    dx = torch.empty_like(x2)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    block, warps = _config(n_cols)
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0),
                                      dx.stride(0), n_rows, n_cols, rows_per_program, BLOCK=block, num_warps=warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = _rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy, x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The PyTorch fallback, float32 inside like the kernel."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension.

    x: (..., N) float16/bfloat16/float32; weight: (N,). Returns x's shape and dtype. The normalisation and
    the product with weight run in float32 and are rounded once (transformers' Llama rounds x_hat to x's
    dtype before multiplying by weight; this differs from it by at most that one rounding).
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight must be (N,) with N = x.shape[-1]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device}, weight on {weight.device}; put them on one device")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm: x and weight must be floating point; got {x.dtype}, {weight.dtype}")
    if x.shape[-1] > MAX_COLS:
        raise ValueError(f"rms_norm: rows of {x.shape[-1]} are wider than the kernel's {MAX_COLS}")
    if x.numel() == 0 or dispatch("rms_norm", x.device) == "torch":
        return rms_norm_torch(x, weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))
