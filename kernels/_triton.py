"""Which implementation a kernel runs on a device — Triton or its PyTorch fallback — and why; the one place that
imports Triton.

`FLOTILLA_KERNELS` (or `force_implementation`, which takes precedence within its block) says what is asked for:
- `auto` (the default): on CUDA, Triton only for kernels that kernels/verified.py lists for the GPU's compute
  capability (checked on such a GPU and measured at least as fast as PyTorch), PyTorch for the others;
- `triton`: Triton wherever it can run, verified or not (the GPU tests and benchmarks, which verify it);
- `torch`: always the PyTorch fallbacks.
Where Triton can run: it is installed and either the tensors are on CUDA, or they are on the CPU and Triton's
interpreter is on (`TRITON_INTERPRET=1`, read by Triton when a kernel is decorated, so it must be set before
`kernels` is imported; tests/conftest.py does that on machines without CUDA). The interpreter exists to check
the kernels, so under it `auto` runs them on the CPU too. Each (kernel, implementation, device type) is logged
once, with the reason, on the `flotilla.kernels` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Iterator

import torch

from kernels.verified import verification, verified_capabilities

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
REQUESTS = ("auto", "triton", "torch")
"""What FLOTILLA_KERNELS and force_implementation accept."""

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flotilla_kernels_forced", default=None)
_reported: set[tuple[str, str, str]] = set()


def requested() -> tuple[str, str]:
    """(what is asked for: 'auto', 'triton' or 'torch', who asked it): force_implementation's value within its
    block, else FLOTILLA_KERNELS's."""
    forced = _forced.get()
    if forced is not None:
        return forced, f"force_implementation({forced!r})"
    value = os.environ.get("FLOTILLA_KERNELS", "auto")
    if value not in REQUESTS:
        raise ValueError(f"FLOTILLA_KERNELS={value!r} is not understood; allowed: 'auto' (on CUDA, Triton only for "
                         "kernels verified on that GPU: kernels/verified.py), 'triton' (Triton wherever it can "
                         "run) or 'torch' (always the PyTorch fallbacks)")
    return value, f"FLOTILLA_KERNELS={value}"


def sm(capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm_90'."""
    return f"sm_{capability[0]}{capability[1]}"


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    """The compute capability of a CUDA device of this process; None where this process has no CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    return _capability_of(torch.cuda.current_device() if index is None else index)


def choose(kernel: str, device: torch.device | str, capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """('triton' or 'torch', why): what `kernel` runs for tensors on `device`, and the reason in words (for the
    log and `flotilla plan`).

    capability: the CUDA compute capability the choice is for; None means the GPU's of this process, unknown
    where it has no CUDA (`flotilla plan` on a machine without the workers' GPU). Pure and cheap: no tensor.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    request, asked_by = requested()
    if request == "torch":
        return "torch", asked_by
    if not HAS_TRITON:
        return "torch", "Triton is not installed"
    device_type = torch.device(device).type
    if INTERPRET:
        # Interpreted kernels run on host memory (FusedAdamW's pointer tables need real host addresses), compiled
        # ones on CUDA memory; a kernel is one or the other for the whole process.
        if device_type == "cpu":
            return "triton", "interpreted on the CPU (TRITON_INTERPRET=1)"
        return "torch", f"TRITON_INTERPRET=1: interpreted kernels run on host memory, not on {device_type}"
    if device_type != "cuda":
        return "torch", f"Triton compiles these kernels for CUDA, not {device_type}"
    if request == "triton":
        return "triton", f"{asked_by}, verified or not"
    if capability is None:
        capability = cuda_capability(device)
    if capability is None:
        listed = verified_capabilities(kernel)
        where = (f"on {', '.join(map(sm, listed))} only, PyTorch on other GPUs" if listed
                 else "on no GPU yet: PyTorch on any")
        return "torch", (f"GPU unknown here (no CUDA on this machine); kernels/verified.py lists {kernel} {where}; "
                         "FLOTILLA_KERNELS=triton to run it")
    evidence = verification(kernel, capability)
    if evidence is None:
        return "torch", (f"{kernel} not verified on {sm(capability)} (kernels/verified.py); FLOTILLA_KERNELS=triton "
                         "to run it")
    return "triton", (f"verified on {sm(capability)} (kernels/verified.py: {evidence.device}, {evidence.date}, "
                      f"{evidence.speedup:.2f}x PyTorch)")


def implementation(kernel: str, device: torch.device | str, capability: tuple[int, int] | None = None) -> str:
    """'triton' or 'torch': what `kernel` runs for tensors on `device` (choose() without the reason)."""
    return choose(kernel, device, capability)[0]


def dispatch(kernel: str, device: torch.device) -> str:
    """implementation(), logged with its reason the first time each (kernel, implementation, device type) is
    used: at WARNING when FLOTILLA_KERNELS=triton asked for Triton and a CUDA tensor gets the fallback (a large,
    silent slowdown otherwise)."""
    impl, why = choose(kernel, device)
    key = (kernel, impl, device.type)
    if key not in _reported:
        _reported.add(key)
        unexpected = impl == "torch" and device.type == "cuda" and requested()[0] == "triton"
        log.log(logging.WARNING if unexpected else logging.INFO, "kernel %s on %s: %s, %s", kernel, device.type,
                impl, why)
    return impl


@contextlib.contextmanager
def force_implementation(impl: str | None) -> Iterator[None]:
    """Within the block, kernels choose as if FLOTILLA_KERNELS were `impl`: 'triton' (Triton wherever it can
    run), 'torch' (the fallbacks) or 'auto' (verified kernels only); None: as FLOTILLA_KERNELS says."""
    if impl is not None and impl not in REQUESTS:
        raise ValueError(f"force_implementation({impl!r}): allowed: {', '.join(map(repr, REQUESTS))} or None (as "
                         "FLOTILLA_KERNELS says)")
    token = _forced.set(impl)
    try:
        yield
    finally:
        _forced.reset(token)
