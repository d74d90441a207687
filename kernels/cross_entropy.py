"""Fused linear + cross-entropy: the loss of logits = hidden @ weight.T without ever holding all the logits.

Tokens are processed in chunks (as in Liger-Kernel's FusedLinearCrossEntropy): for each chunk the logits
(chunk, V) are computed by one matmul, `_cross_entropy_fwd_kernel` takes each row's log-sum-exp and loss in
one streaming pass, and, when gradients are wanted, `_cross_entropy_bwd_kernel` overwrites the same buffer
with d loss / d logits = (softmax - onehot) * scale, from which two matmuls give this chunk's grad_hidden and
its contribution to grad_weight. The gradients are therefore computed during the forward; the backward only
multiplies them by the incoming gradient. Peak extra memory is one (chunk, V) logits buffer plus a float32
(V, H) grad_weight accumulator, instead of (tokens, V) logits, their float32 copy and their gradient.

grad_weight is accumulated over chunks in float32 (bf16 GEMMs write float32 directly on CUDA), so it is
rounded once at the end like the unfused matmul's, not once per chunk.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import INTERPRET, dispatch, tl, triton

log = logging.getLogger("flotilla.kernels")
REDUCTIONS = ("mean", "sum")


@triton.jit
def _cross_entropy_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, stride_row, n_cols, ignore_index, BLOCK_V: tl.constexpr):
    """Per row: lse = logsumexp(logits) (online over column tiles), loss = lse - logits[target]; 0 if ignored."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.full([], 0.0, dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    x_target = tl.load(base + target, mask=target != ignore_index, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(target == ignore_index, 0.0, lse - x_target))
    tl.store(LSE + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(LOGITS, TARGETS, LSE, SCALE, stride_row, n_cols, ignore_index,
                              BLOCK_V: tl.constexpr):
    """Per row, in place: logits <- (softmax(logits) - onehot(target)) * scale; zeros if ignored."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(SCALE))
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _block_v(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096 columns over 8 warps is 16 per thread per tile, so a 128k vocabulary
    streams in 32 tiles. In the interpreter, 64-column tiles make test vocabularies span several tiles."""
    if INTERPRET:
        return min(64, triton.next_power_of_2(n_cols)), 1
    return min(4096, triton.next_power_of_2(n_cols)), 8


def _ce_rows_fwd(logits: Tensor, targets: Tensor, ignore_index: int, use_triton: bool) -> tuple[Tensor, Tensor]:
    """logits (C, V) -> per-row loss (C,) and log-sum-exp (C,), float32."""
    if not use_triton:
        lse = torch.logsumexp(logits.float(), dim=-1)
        ignored = targets == ignore_index
        x_target = logits.gather(1, torch.where(ignored, 0, targets).long()[:, None]).squeeze(1).float()
        return torch.where(ignored, 0.0, lse - x_target), lse
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block, warps = _block_v(n_cols)
    _cross_entropy_fwd_kernel[(n_rows,)](logits, targets, loss, lse, logits.stride(0), n_cols, ignore_index,
                                         BLOCK_V=block, num_warps=warps)
    return loss, lse


def _ce_rows_bwd_(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, ignore_index: int,
                  use_triton: bool) -> None:
    """In place: logits (C, V) become d loss / d logits, times scale (a float32 device scalar)."""
    if not use_triton:
        ignored = targets == ignore_index
        grad = torch.exp(logits.float() - lse[:, None])
        grad[torch.arange(len(targets), device=logits.device), torch.where(ignored, 0, targets).long()] -= 1.0
        logits.copy_(grad * torch.where(ignored, 0.0, scale)[:, None])
        return
    n_rows, n_cols = logits.shape
    block, warps = _block_v(n_cols)
    _cross_entropy_bwd_kernel[(n_rows,)](logits, targets, lse, scale, logits.stride(0), n_cols, ignore_index,
                                         BLOCK_V=block, num_warps=warps)


_out_dtype_gemm = True  # torch.addmm(..., out_dtype=float32) on CUDA (torch >= 2.8); cleared if unsupported


def _addmm_float32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (float32) += a @ b for a, b in any one float dtype; half inputs are multiplied at full speed and
    their float32 products added without rounding to the half dtype first where the GEMM allows it."""
    global _out_dtype_gemm
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _out_dtype_gemm:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError) as e:
            _out_dtype_gemm = False
            log.warning("fused_linear_cross_entropy: no float32-output GEMM for %s (%s); each chunk's grad_weight "
                        "is rounded to %s before it is added", a.dtype, e, a.dtype)
    acc.add_(a @ b)


def _chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk so that a chunk's logits are about as large as the hidden states (Liger-Kernel's
    choice): memory stays at the size of the input while each GEMM keeps >= hidden/vocab * tokens rows."""
    rows = max(1, -(-n_tokens // -(-vocab // hidden)))  # ceil(n_tokens / ceil(vocab / hidden))
    return 1 << (rows - 1).bit_length()  # the next power of two


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_size, use_triton):
        n_tokens = hidden.shape[0]
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (targets != ignore_index).sum()
        # d loss / d logits carries the reduction's scale from the start: 1/n_valid for 'mean'
        scale = (1.0 / n_valid.float()) if reduction == "mean" else torch.ones((), device=hidden.device)
        loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_dh else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h, t = hidden[start:end], targets[start:end]
            logits = h @ weight.t()  # (chunk, V), the only vocabulary-sized buffer
            loss_rows[start:end], lse = _ce_rows_fwd(logits, t, ignore_index, use_triton)
            if want_dh or want_dw:
                _ce_rows_bwd_(logits, t, lse, scale, ignore_index, use_triton)
                if want_dh:
                    torch.mm(logits, weight, out=grad_hidden[start:end])
                if want_dw:
                    _addmm_float32_(grad_weight, logits.t(), h)
        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / n_valid  # no valid target: nan, as F.cross_entropy gives
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = None if grad_hidden is None else grad_hidden * grad_loss
        dw = None if grad_weight is None else grad_weight * grad_loss
        return dh, dw, None, None, None, None, None


def fused_linear_cross_entropy_torch(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                                     reduction: str = "mean") -> Tensor:
    """The unfused reference: full float32 logits, F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                               reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """Cross-entropy of hidden @ weight.T against targets, chunked over tokens.

    hidden: (..., H); weight: (V, H) in hidden's dtype; targets: (...) integer class ids in [0, V) or
    ignore_index (those tokens add no loss and no gradient). reduction: 'mean' (over non-ignored tokens;
    nan when there are none, as F.cross_entropy) or 'sum'. chunk_size: tokens per chunk (default: logits of
    a chunk about the size of hidden). Returns a float32 scalar, differentiable in hidden and weight.
    Targets outside [0, V) are not checked (that would cost a device sync): they give a wrong loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction={reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: want hidden (..., H) and weight (V, H); got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: targets {tuple(targets.shape)} must be hidden's shape "
                         f"without its last dim, {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"fused_linear_cross_entropy: hidden and weight must share one float dtype; got "
                         f"{hidden.dtype}, {weight.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_linear_cross_entropy: targets must be int32 or int64; got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"fused_linear_cross_entropy: hidden, weight, targets on {hidden.device}, "
                         f"{weight.device}, {targets.device}; put them on one device")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1; got {chunk_size}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1).contiguous()
    vocab, width = weight.shape
    chunk_size = chunk_size or _chunk_size(hidden2.shape[0], vocab, width)
    use_triton = dispatch("fused_linear_cross_entropy", hidden.device) == "triton"
    return FusedLinearCrossEntropyFunction.apply(hidden2, weight, targets1, ignore_index, reduction, chunk_size,
                                                 use_triton)
