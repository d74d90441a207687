"""Which implementation runs, and proof that it does: under TRITON_INTERPRET=1 every public kernel launches its
Triton kernels (counted), forcing 'torch' launches none, a machine without Triton imports `kernels` and runs
the fallbacks, and the interpreter rounds bfloat16 as the GPU does."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import force_implementation, implementation
from kernels._triton import INTERPRET, tl, triton

pytestmark = pytest.mark.skipif(not INTERPRET, reason="checks the CPU interpreter path (TRITON_INTERPRET=1)")


class LaunchCounter:
    """Stands in for a @triton.jit kernel and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _run_attention():
    q, k, v = (torch.randn(20, h, 16, requires_grad=True) for h in (4, 2, 2))
    kernels.flash_attn_varlen(q, k, v, torch.tensor([0, 7, 20], dtype=torch.int32), 13).sum().backward()


def _run_adamw():
    p = torch.randn(40, requires_grad=True)
    p.grad = torch.randn(40)
    kernels.FusedAdamW([p], max_grad_norm=1.0).step()


def _run_rms_norm():
    kernels.rms_norm(torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)).sum().backward()


def _run_rope():
    cos, sin = torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8)
    kernels.rope(torch.randn(2, 5, 3, 8, requires_grad=True), cos, sin).sum().backward()


def _run_swiglu():
    kernels.swiglu(torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)).sum().backward()


def _run_cross_entropy():
    h = torch.randn(6, 8, requires_grad=True)
    kernels.fused_linear_cross_entropy(h, torch.randn(20, 8), torch.randint(0, 20, (6,))).backward()


KERNEL_CASES = {
    # public kernel: (module, its Triton kernels, a forward+backward or step that must launch each of them)
    "flash_attn": ("kernels.attention", ["_flash_attn_fwd_kernel", "_flash_attn_bwd_preprocess_kernel",
                                         "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"], _run_attention),
    "fused_adamw": ("kernels.adamw", ["_grad_sq_norm_kernel", "_fused_adamw_kernel"], _run_adamw),
    "rms_norm": ("kernels.rmsnorm", ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"], _run_rms_norm),
    "rope": ("kernels.rope", ["_rope_fwd_kernel", "_rope_bwd_kernel"], _run_rope),
    "swiglu": ("kernels.swiglu", ["_swiglu_fwd_kernel", "_swiglu_bwd_kernel"], _run_swiglu),
    "fused_linear_cross_entropy": ("kernels.cross_entropy", ["_cross_entropy_fwd_kernel",
                                                             "_cross_entropy_bwd_kernel"], _run_cross_entropy),
}


def test_every_kernel_has_a_case():
    assert set(KERNEL_CASES) == set(kernels.KERNELS)


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_interpreter_runs_the_triton_kernels(name, monkeypatch):
    module_name, kernel_names, run = KERNEL_CASES[name]
    module = importlib.import_module(module_name)
    counters = {k: LaunchCounter(getattr(module, k)) for k in kernel_names}
    for k, counter in counters.items():
        monkeypatch.setattr(module, k, counter)
    assert implementation(name, "cpu") == "triton"
    run()
    assert {k: c.launches > 0 for k, c in counters.items()} == {k: True for k in counters}
    with force_implementation("torch"):
        assert implementation(name, "cpu") == "torch"
        before = {k: c.launches for k, c in counters.items()}
        run()
        assert {k: c.launches for k, c in counters.items()} == before


def test_compiled_kernels_are_not_claimed_for_cuda_in_interpreter_mode():
    # interpreted kernels run on host memory; CUDA tensors then take the fallback
    assert implementation("flash_attn", "cuda") == "torch"


def test_environment_forces_the_fallback(monkeypatch):
    with force_implementation(None):  # as FLOTILLA_KERNELS says, not as conftest.py forces
        monkeypatch.setenv("FLOTILLA_KERNELS", "torch")
        assert implementation("rope", "cpu") == "torch"
        monkeypatch.setenv("FLOTILLA_KERNELS", "auto")
        assert implementation("rope", "cpu") == "triton"  # the interpreter is there to check the kernels


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="unknown kernel 'matmul'"):
        implementation("matmul", "cpu")


def test_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr("kernels._triton._reported", set())
    with caplog.at_level(logging.INFO, logger="flotilla.kernels"):
        _run_swiglu()
        _run_swiglu()
    messages = [r.getMessage() for r in caplog.records if "swiglu" in r.getMessage()]
    assert messages == ["kernel swiglu on cpu: triton, interpreted on the CPU (TRITON_INTERPRET=1)"]


def test_without_triton_everything_falls_back():
    """A fresh interpreter where `import triton` fails: kernels imports, reports 'torch', and computes."""
    script = """
import sys
sys.modules["triton"] = None  # import triton -> ImportError
import torch, kernels
assert kernels.implementation("flash_attn", "cpu") == "torch"
q = torch.randn(2, 6, 4, 16)
out = kernels.flash_attn(q, q[:, :, :2], q[:, :, :2])
ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), q[:, :, :2].transpose(1, 2),
    q[:, :, :2].transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
torch.testing.assert_close(out, ref)
p = torch.randn(5, requires_grad=True); p.grad = torch.ones(5)
kernels.FusedAdamW([p], max_grad_norm=1.0).step()
kernels.rms_norm(torch.randn(3, 8), torch.ones(8)); kernels.swiglu(torch.randn(4), torch.randn(4))
kernels.rope(torch.randn(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
kernels.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@triton.jit
def _store_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _dot_kernel(A, B, C, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(A + offs[:, None] * N + offs[None, :])
    b = tl.load(B + offs[:, None] * N + offs[None, :])
    tl.store(C + offs[:, None] * N + offs[None, :], tl.dot(a, b))


def test_interpreter_rounds_bfloat16_like_the_gpu():
    """float32 -> bfloat16 stores round to nearest even (ties included), keep inf and NaN: bit-for-bit what
    torch's .to(bfloat16) (and the GPU's cvt.rn) gives."""
    one_ulp = 2.0**-7
    x = torch.cat([torch.randn(1000) * 100, torch.tensor([1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2),
                                                           float("inf"), float("-inf"), float("nan"), 3.4e38])])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _store_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    number = ~x.isnan()
    assert torch.equal(y.view(torch.int16)[number], want.view(torch.int16)[number])
    assert y[~number].isnan().all()


def test_interpreter_multiplies_bfloat16_tiles():
    a, b = torch.randn(16, 16, dtype=torch.bfloat16), torch.randn(16, 16, dtype=torch.bfloat16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-5, rtol=1e-5)
