"""The Triton kernels that `FLOTILLA_KERNELS=auto` (the default) runs on a CUDA GPU: those whose checks passed
on a GPU of that compute capability and whose benchmark there was at least as fast as the PyTorch code they
replace. Every other kernel runs its PyTorch fallback on CUDA; `FLOTILLA_KERNELS=triton` runs them anyway.

The table is empty: none of our kernels has run on a GPU yet, so `auto` runs PyTorch everywhere on CUDA.

How a row gets here, on the GPU machine (see ../shared/GPU.md), for one compute capability:
1. `python -m pytest -m gpu tests/gpu -q` and `python -m pytest tests/unit/kernels -q` pass; both force
   Triton themselves (tests/gpu/conftest.py, tests/unit/kernels/conftest.py), so they run what they test.
2. `python bench/kernels.py` writes bench/results/kernels.md (device, date, versions, forced to Triton). A
   kernel qualifies if each of its rows there shows `speedup` >= 1.00 against the PyTorch baseline:
   `attention` and `packed` rows for flash_attn, `adamw` for fused_adamw, `linear+CE` for
   fused_linear_cross_entropy, `RMSNorm` / `RoPE` / `SwiGLU` for rms_norm / rope / swiglu.
3. Add `("kernel", (major, minor)): Verification(...)` below, with what step 2 recorded, and commit the table
   with bench/results/kernels.md. A kernel that fails or loses on a later run (new Triton, new torch) is
   taken out again: the table says what was measured, not what was hoped.

The key is the compute capability that `torch.cuda.get_device_capability()` reports: (9, 0) for H100 and
H200, (8, 0) for A100. Kernels compiled for one capability say nothing about another.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verification:
    """The evidence behind one row: where and when it was measured."""

    device: str
    """torch.cuda.get_device_name(), e.g. 'NVIDIA H100 80GB HBM3'."""
    date: str
    """ISO date of the GPU test run and of bench/results/kernels.md."""
    versions: str
    """torch, CUDA and Triton of those runs, e.g. 'torch 2.11.0, CUDA 13.0, triton 3.5.0'."""
    speedup: float
    """The smallest speedup over PyTorch among the kernel's rows in bench/results/kernels.md (>= 1)."""


VERIFIED: dict[tuple[str, tuple[int, int]], Verification] = {}
"""(kernel name as in kernels.KERNELS, (major, minor) compute capability) -> its evidence."""


def verification(kernel: str, capability: tuple[int, int]) -> Verification | None:
    """The evidence that `kernel` is correct and no slower than PyTorch on GPUs of `capability`, or None."""
    return VERIFIED.get((kernel, tuple(capability)))


def verified_capabilities(kernel: str) -> list[tuple[int, int]]:
    """Every compute capability `kernel` is verified on, sorted."""
    return sorted(capability for name, capability in VERIFIED if name == kernel)
