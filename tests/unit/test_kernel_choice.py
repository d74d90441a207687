"""Which implementation a kernel runs and why (kernels.choose): on CUDA, `auto` runs Triton only where
kernels/verified.py lists the kernel for the GPU's compute capability; FLOTILLA_KERNELS=triton runs it wherever
it can; errors name the variable, the value and what is allowed. Triton is made to look compiled (not
interpreted) and the GPU's capability is set by hand, so this runs on a machine without one."""

from __future__ import annotations

import pytest

import kernels
from kernels import choose, force_implementation
from kernels.verified import VERIFIED, Verification

H100 = Verification("NVIDIA H100 80GB HBM3", "2026-12-01", "torch 2.11.0, CUDA 13.0, triton 3.5.0", 1.31)


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch):
    monkeypatch.delenv("FLOTILLA_KERNELS", raising=False)
    monkeypatch.setattr("kernels._triton.INTERPRET", False)
    monkeypatch.setattr("kernels._triton.HAS_TRITON", True)
    monkeypatch.setattr("kernels._triton.cuda_capability", lambda device: (9, 0))


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_auto_runs_pytorch_on_cuda_for_unverified_kernels(kernel):
    assert choose(kernel, "cuda") == ("torch", f"{kernel} not verified on sm_90 (kernels/verified.py); "
                                               "FLOTILLA_KERNELS=triton to run it")


def test_auto_runs_triton_where_verified_for_that_capability_only(monkeypatch):
    monkeypatch.setattr("kernels.verified.VERIFIED", {("swiglu", (9, 0)): H100})
    impl, why = choose("swiglu", "cuda:0")
    assert impl == "triton" and why == ("verified on sm_90 (kernels/verified.py: NVIDIA H100 80GB HBM3, 2026-12-01, "
                                        "1.31x PyTorch)")
    assert choose("swiglu", "cuda", capability=(8, 0))[0] == "torch"  # an A100 is another compiled program
    assert choose("rms_norm", "cuda")[0] == "torch"  # verification is per kernel
    assert choose("swiglu", "cpu")[0] == "torch"  # compiled Triton runs on CUDA tensors only


def test_unknown_gpu_is_said_to_be_unknown(monkeypatch):
    monkeypatch.setattr("kernels._triton.cuda_capability", lambda device: None)
    impl, why = choose("rope", "cuda")
    assert impl == "torch" and why == ("GPU unknown here (no CUDA on this machine); kernels/verified.py lists rope "
                                       "on no GPU yet: PyTorch on any; FLOTILLA_KERNELS=triton to run it")
    monkeypatch.setattr("kernels.verified.VERIFIED", {("rope", (9, 0)): H100, ("rope", (10, 0)): H100})
    assert choose("rope", "cuda")[1].startswith("GPU unknown here (no CUDA on this machine); kernels/verified.py "
                                                "lists rope on sm_90, sm_100 only, PyTorch on other GPUs")
    assert choose("rope", "cuda", capability=(10, 0))[0] == "triton"


def test_triton_requested_runs_unverified_kernels_on_cuda(monkeypatch):
    monkeypatch.setenv("FLOTILLA_KERNELS", "triton")
    assert choose("flash_attn", "cuda") == ("triton", "FLOTILLA_KERNELS=triton, verified or not")
    assert choose("flash_attn", "cpu")[0] == "torch"  # where it cannot run, nothing would: the fallback
    with force_implementation("torch"):  # the context beats the environment
        assert choose("flash_attn", "cuda") == ("torch", "force_implementation('torch')")
    monkeypatch.setenv("FLOTILLA_KERNELS", "torch")
    with force_implementation("triton"):
        assert choose("fused_adamw", "cuda") == ("triton", "force_implementation('triton'), verified or not")
    assert choose("fused_adamw", "cuda") == ("torch", "FLOTILLA_KERNELS=torch")


def test_without_triton_or_under_the_interpreter_cuda_gets_the_fallback(monkeypatch):
    monkeypatch.setenv("FLOTILLA_KERNELS", "triton")
    monkeypatch.setattr("kernels._triton.INTERPRET", True)
    assert choose("rms_norm", "cuda") == ("torch", "TRITON_INTERPRET=1: interpreted kernels run on host memory, "
                                                   "not on cuda")
    monkeypatch.setattr("kernels._triton.HAS_TRITON", False)
    assert choose("rms_norm", "cuda") == ("torch", "Triton is not installed")


def test_bad_requests_name_the_variable_the_value_and_what_is_allowed(monkeypatch):
    monkeypatch.setenv("FLOTILLA_KERNELS", "fast")
    with pytest.raises(ValueError) as err:
        choose("rope", "cuda")
    assert "FLOTILLA_KERNELS='fast'" in str(err.value)
    assert all(f"'{allowed}'" in str(err.value) for allowed in ("auto", "triton", "torch"))
    with pytest.raises(ValueError, match=r"force_implementation\('cuda'\): allowed: 'auto', 'triton', 'torch'"):
        with force_implementation("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown kernel 'matmul'"):
        choose("matmul", "cuda")


def test_the_verified_table_is_well_formed():
    """A row names a kernel that exists, a (major, minor) capability, and a measured speedup of at least 1."""
    for (kernel, capability), evidence in VERIFIED.items():
        assert kernel in kernels.KERNELS, kernel
        assert len(capability) == 2 and all(isinstance(c, int) for c in capability), capability
        assert evidence.speedup >= 1.0 and evidence.device and evidence.date and evidence.versions, (kernel, evidence)


def test_the_model_and_optimizer_follow_the_kernels_choice(monkeypatch):
    """trainers' own `auto` layers ask kernels.choose on CUDA, and keep PyTorch on a CPU."""
    from trainers.attention import attention_choice
    from trainers.config import OptimConfig
    from trainers.model import kernel_choice
    from trainers.optim import choose_optimizer

    assert attention_choice("auto", "cuda")[0] == "varlen_attn" and kernel_choice("auto", "rope", "cuda")[0] == "torch"
    assert attention_choice("triton", "cuda")[0] == "torch fallback (per-document SDPA)"
    assert not choose_optimizer(OptimConfig(), "cuda").fused
    bf16 = choose_optimizer(OptimConfig(moments_dtype="bfloat16"), "cuda")
    assert bf16.fused and bf16.implementation == "torch"  # FusedAdamW for its moments, on its PyTorch code
    monkeypatch.setattr("kernels.verified.VERIFIED", {(k, (9, 0)): H100 for k in ("flash_attn", "rope", "fused_adamw")})
    assert attention_choice("auto", "cuda")[0] == "triton" and kernel_choice("auto", "rope", "cuda")[0] == "triton"
    assert kernel_choice("auto", "rope", "cpu") == ("torch", "model.kernels = auto on cpu")
    assert kernel_choice("torch", "rope", "cuda") == ("torch", "model.kernels = torch")
    assert choose_optimizer(OptimConfig(), "cuda").describe().startswith("FusedAdamW (Triton): verified on sm_90")
    assert not choose_optimizer(OptimConfig(), "cuda", engine="deepspeed").fused
    assert not choose_optimizer(OptimConfig(implementation="torch"), "cuda").fused
