"""Fused rotary position embedding, rotate_half convention (transformers' Llama): dimension i pairs with
i + D/2, y = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) for halves x1, x2. That is

  y1 = x1 * cos1 - x2 * sin1,   y2 = x2 * cos2 + x1 * sin2

and its transpose is the backward:

  dx1 = dy1 * cos1 + dy2 * sin2,   dx2 = dy2 * cos2 - dy1 * sin1.

(Llama's tables repeat each frequency over both halves, cos1 == cos2, but any full-width table works.)
One program rotates every head of one token, so each token's cos/sin row is read once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import INTERPRET, dispatch, tl, triton


@triton.jit
def _rope_rotate(X, COS, SIN, Y, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st, n_heads,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    mask = (heads[:, None] < n_heads) & d_mask[None, :]
    cos1 = tl.load(COS + tok * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(COS + tok * stride_ct + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + tok * stride_st + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + tok * stride_st + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    x_ptrs = X + tok * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    y_ptrs = Y + tok * stride_yt + heads[:, None] * stride_yh + d[None, :]
    tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(X, COS, SIN, Y, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st, n_heads,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    _rope_rotate(X, COS, SIN, Y, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st, n_heads,
                 HALF, BLOCK_H, BLOCK_HALF, False)


@triton.jit
def _rope_bwd_kernel(DY, COS, SIN, DX, stride_dyt, stride_dyh, stride_dxt, stride_dxh, stride_ct, stride_st,
                     n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    _rope_rotate(DY, COS, SIN, DX, stride_dyt, stride_dyh, stride_dxt, stride_dxh, stride_ct, stride_st, n_heads,
                 HALF, BLOCK_H, BLOCK_HALF, True)


def _tokens(x: Tensor) -> Tensor:
    """x (..., H, D) as (tokens, H, D) with a contiguous last dim (a view when it can be)."""
    x3 = x.reshape(-1, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _table(t: Tensor, x: Tensor) -> Tensor:
    """cos or sin broadcast to x's tokens: (tokens, D), a view when t already has one row per token."""
    if t.dim() == x.dim() and t.shape[-2] == 1:  # the model's (B, S, 1, D): a size-1 head axis
        t = t.squeeze(-2)
    t = t.expand(*x.shape[:-2], x.shape[-1]).reshape(-1, x.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, src: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    n_tokens, n_heads, head_dim = src.shape
    out = torch.empty_like(src)
    half = head_dim // 2
    kernel[(n_tokens,)](src, cos, sin, out, src.stride(0), src.stride(1), out.stride(0), out.stride(1),
                        cos.stride(0), sin.stride(0), n_heads, HALF=half,
                        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_HALF=triton.next_power_of_2(half),
                        num_warps=1 if INTERPRET else 4)
    return out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos_t, sin_t = _table(cos, x), _table(sin, x)
        ctx.save_for_backward(cos_t, sin_t)
        ctx.x_shape = x.shape
        return _launch(_rope_fwd_kernel, _tokens(x), cos_t, sin_t).view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        cos_t, sin_t = ctx.saved_tensors
        dy3 = dy.reshape(-1, *ctx.x_shape[-2:])
        dy3 = dy3 if dy3.stride(-1) == 1 else dy3.contiguous()
        return _launch(_rope_bwd_kernel, dy3, cos_t, sin_t).view(ctx.x_shape), None, None


def rope_torch(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The PyTorch fallback: the same float32 products, rounded once to x's dtype."""
    if cos.dim() != x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # token-aligned (..., D) tables: add the head axis
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.float() + rotated * sin.float()).to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys by their positions' angles.

    x: (..., H, D), e.g. (B, S, H, D) or packed (T, H, D), D even. cos, sin: (..., D) over x's token axes,
    e.g. (B, S, D), (S, D) or (T, D), or with a size-1 head axis as the model builds them, (B, S, 1, D); any
    float dtype. Returns x's shape and dtype (products in float32, rounded once). cos and sin get no
    gradient: they are tables, not parameters.
    """
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be (..., H, D) with D even; got {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rope: cos/sin last dim {cos.shape[-1]} must equal the head dim {x.shape[-1]}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos/sin require grad, but the rotation gives them none; pass detached tables")
    if not (x.device == cos.device == sin.device):
        raise ValueError(f"rope: x, cos, sin must be on one device; got {x.device}, {cos.device}, {sin.device}")
    token_shape = tuple(x.shape[:-2])
    table_shape = tuple(cos.shape[:-2]) if cos.dim() == x.dim() and cos.shape[-2] == 1 else tuple(cos.shape[:-1])
    try:
        torch.broadcast_shapes(table_shape, token_shape)
    except RuntimeError:
        raise ValueError(f"rope: cos/sin {tuple(cos.shape)} do not broadcast over x's tokens {token_shape} "
                         f"(want (..., D) or (..., 1, D) over x's (..., H, D))") from None
    if torch.broadcast_shapes(table_shape, token_shape) != token_shape:
        raise ValueError(f"rope: cos/sin {tuple(cos.shape)} have more tokens than x {tuple(x.shape)}")
    if x.numel() == 0 or dispatch("rope", x.device) == "torch":
        return rope_torch(x, cos, sin)
    return RopeFunction.apply(x, cos, sin)
