"""Which implementation a kernel runs on a device — Triton or its PyTorch fallback — and the one place that
imports Triton.

Triton runs when it is installed and either the tensors are on CUDA, or they are on the CPU and Triton's
interpreter is on (`TRITON_INTERPRET=1`, read by Triton when a kernel is decorated, so it must be set before
`kernels` is imported; tests/conftest.py does that on machines without CUDA). Everywhere else the kernel's
PyTorch fallback runs. `FLOTILLA_KERNELS=torch` (or `force_implementation("torch")`) forces the fallback.
Each (kernel, implementation, device type) is logged once, on the `flotilla.kernels` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch fallbacks still work; kernel definitions below only need these names to exist
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so modules defining kernels import; never launched."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

# Triton reads TRITON_INTERPRET when a kernel is decorated: what it was at import time is what kernels do.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
log = logging.getLogger("flotilla.kernels")


def _round_like_the_gpu_in_the_interpreter() -> None:
    """Make Triton's CPU interpreter round bfloat16 as the GPU does, so tests check what the GPU computes.

    Triton 3.9's interpreter (triton/runtime/interpreter.py) truncates float32 -> bfloat16 conversions
    (the GPU rounds to nearest even: truncation biases every stored bf16 value and doubles its error), and its
    tl.dot multiplies bfloat16 tiles as their raw 16-bit integers. Both are replaced, in this process only and
    only under TRITON_INTERPRET=1, by exact equivalents of the GPU's behaviour.
    """
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def bf16_bits(f32):  # numpy float32 array -> bfloat16 bit patterns, round to nearest even, NaN kept NaN
        bits = f32.view("uint32").astype("uint64")
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("uint16")
        out[f32 != f32] = 0x7FC0
        return out

    def bf16_to_f32(handle):
        return TensorHandle((handle.data.astype("uint32") << 16).view("float32"), tl.float32)

    cast_impl, fp_to_fp, create_dot = (InterpreterBuilder.cast_impl, InterpreterBuilder.create_fp_to_fp,
                                       InterpreterBuilder.create_dot)

    def rounded(original):
        def convert(self, src, dst_type, *rest):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return TensorHandle(bf16_bits(src.data), tl.bfloat16)
            return original(self, src, dst_type, *rest)
        return convert

    def dot(self, a, b, d, *rest):
        a = bf16_to_f32(a) if a.dtype.scalar == tl.bfloat16 else a
        b = bf16_to_f32(b) if b.dtype.scalar == tl.bfloat16 else b
        return create_dot(self, a, b, d, *rest)

    InterpreterBuilder.cast_impl = rounded(cast_impl)
    InterpreterBuilder.create_fp_to_fp = rounded(fp_to_fp)
    InterpreterBuilder.create_dot = dot


if INTERPRET:
    try:
        _round_like_the_gpu_in_the_interpreter()
    except (ImportError, AttributeError) as err:  # a Triton whose interpreter is laid out differently
        log.warning("kernels: could not correct the Triton interpreter's bfloat16 rounding (%s); interpreted "
                    "bf16 results will be less accurate than the GPU's", err)

KERNELS = ("flash_attn", "fused_adamw", "rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
IMPLEMENTATIONS = ("triton", "torch")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flotilla_kernels_forced", default=None)
_reported: set[tuple[str, str, str]] = set()


def _requested() -> str:
    forced = _forced.get()
    if forced is not None:
        return forced
    value = os.environ.get("FLOTILLA_KERNELS", "auto")
    if value not in ("auto", "torch"):
        raise ValueError(f"FLOTILLA_KERNELS={value!r} is not understood; allowed: 'auto' (Triton where it can "
                         f"run, else PyTorch) or 'torch' (always the PyTorch fallbacks)")
    return value


def implementation(kernel: str, device: torch.device | str) -> str:
    """'triton' or 'torch': what `kernel` runs for tensors on `device`.

    Pure and cheap, so `flotilla plan` can report it before any tensor exists.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    if _requested() == "torch" or not HAS_TRITON:
        return "torch"
    device_type = torch.device(device).type
    # Interpreted kernels run on host memory (FusedAdamW's pointer tables need real host addresses), compiled
    # ones on CUDA memory; a kernel is one or the other for the whole process.
    runs = device_type == "cpu" if INTERPRET else device_type == "cuda"
    return "triton" if runs else "torch"


def dispatch(kernel: str, device: torch.device) -> str:
    """implementation(), logged the first time each (kernel, implementation, device type) is used: at WARNING
    when a CUDA tensor gets the fallback without being asked to (a large, silent slowdown otherwise)."""
    impl = implementation(kernel, device)
    key = (kernel, impl, device.type)
    if key not in _reported:
        _reported.add(key)
        if impl == "triton":
            detail = ", interpreted on the CPU (TRITON_INTERPRET=1)" if INTERPRET else ""
        else:
            detail = (f" (Triton {'installed' if HAS_TRITON else 'missing'}, interpreter "
                      f"{'on' if INTERPRET else 'off'}, requested {_requested()!r})")
        unexpected = impl == "torch" and device.type == "cuda" and _requested() != "torch"
        log.log(logging.WARNING if unexpected else logging.INFO, "kernel %s on %s: %s implementation%s", kernel,
                device.type, impl, detail)
    return impl


@contextlib.contextmanager
def force_implementation(impl: str | None) -> Iterator[None]:
    """Within the block, every kernel runs `impl` where possible: 'torch' forces the fallbacks; None restores
    the automatic choice. ('triton' is not forcible: where Triton cannot run, nothing would.)"""
    if impl not in (None, "torch"):
        raise ValueError(f"force_implementation({impl!r}): only 'torch' (or None for automatic) can be forced")
    token = _forced.set(impl)
    try:
        yield
    finally:
        _forced.reset(token)
