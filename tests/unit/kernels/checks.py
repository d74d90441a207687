"""Comparisons against float64 references, shared by the kernel tests."""

from __future__ import annotations

import torch
from torch import Tensor

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the kernel tests run the kernels: compiled on a CUDA host, through Triton's interpreter on a CPU one
(conftest.py makes it the default device and forces Triton)."""

# (atol, rtol) against float64, by dtype: float32 kernels accumulate in float32 (errors ~1e-6 at these
# sizes); bf16/fp16 are bounded by the output's own rounding (2^-8 and 2^-11 relative) a few times over.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def assert_close(name: str, out: Tensor, ref64: Tensor, atol: float, rtol: float,
                 same_dtype_torch: Tensor | None = None) -> None:
    """out within atol + rtol*|ref| of the float64 reference everywhere, never NaN; when the same-dtype
    PyTorch result is given, out's largest error is also at most twice PyTorch's own (flash-attention's
    test rule: a tolerance that tracks what the dtype can do, not a number picked to pass)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    err = (out.double() - ref64).abs()
    bound = atol + rtol * ref64.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{name}: {(err > bound).sum().item()} of {err.numel()} elements outside "
                                  f"atol={atol}, rtol={rtol}; worst: got {out.flatten()[worst].item():.6g}, "
                                  f"want {ref64.flatten()[worst].item():.6g}")
    if same_dtype_torch is not None:
        torch_err = (same_dtype_torch.double() - ref64).abs().max().item()
        assert err.max().item() <= 2 * torch_err + 1e-6, (
            f"{name}: max error {err.max().item():.3g} vs float64 is over twice PyTorch's own in "
            f"{out.dtype} ({torch_err:.3g})")


def check_op(op, reference, inputs: list[Tensor], differentiable: list[bool], atol: float, rtol: float) -> None:
    """op(*inputs) forward and backward against reference(*inputs) in float64, output and every gradient.

    reference is the plain PyTorch formula, valid in any dtype: with float64 inputs it is the exact answer;
    with the inputs' own half dtype it is PyTorch's own rounding, which op may exceed at most twice. Gradient
    tolerances scale with the largest gradient (they are sums over many terms).
    """
    leaves = [t.clone().requires_grad_(d) for t, d in zip(inputs, differentiable)]
    out = op(*leaves)
    dout = torch.randn_like(out)
    out.backward(dout)

    def as_float64(t):
        return t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t

    exact = [as_float64(t) for t in leaves]
    want = reference(*exact)
    want.backward(dout.double())

    half = out.dtype in (torch.float16, torch.bfloat16)
    if half:
        same = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        same_out = reference(*same)
        same_out.backward(dout)
    assert_close("output", out.detach(), want.detach(), atol, rtol, same_out.detach() if half else None)
    for i, leaf in enumerate(leaves):
        if not leaf.requires_grad:
            continue
        scale = max(1.0, exact[i].grad.abs().max().item())
        assert_close(f"grad of input {i}", leaf.grad, exact[i].grad, atol * scale, rtol,
                     same[i].grad if half else None)
