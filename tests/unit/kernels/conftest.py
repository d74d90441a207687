"""Kernel tests: every case draws fresh inputs from a seed of its own (derived from the test id, so a failure
reproduces), and runs each kernel's Triton code on KERNEL_DEVICE: compiled on a CUDA host, where the tensors the
tests create land on the GPU (the default device), through Triton's interpreter on a CPU (tests/conftest.py set
TRITON_INTERPRET=1 there)."""

import contextlib
import zlib

import pytest
import torch

from kernels import force_implementation
from tests.unit.kernels.checks import KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed_per_case(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _triton_on_the_kernel_device():
    """Forced, whatever FLOTILLA_KERNELS says: these tests are what verifies a kernel (kernels/verified.py), so
    `auto`, which runs only verified kernels on CUDA, would have them compare PyTorch's fallbacks with PyTorch.
    A test that wants the fallback forces 'torch' inside, which takes precedence."""
    on_gpu = torch.device(KERNEL_DEVICE) if KERNEL_DEVICE == "cuda" else contextlib.nullcontext()
    with force_implementation("triton"), on_gpu:
        yield
