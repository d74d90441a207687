"""The kernel tests run what they claim to: every kernel's Triton code on KERNEL_DEVICE (compiled on a CUDA
host, interpreted on a CPU), with the tests' tensors created there; never PyTorch's fallbacks unless asked."""

import pytest
import torch

import kernels
from kernels import force_implementation, implementation
from tests.unit.kernels.checks import KERNEL_DEVICE


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_every_kernel_runs_triton_on_the_test_device(kernel):
    assert torch.empty(1).device.type == KERNEL_DEVICE
    assert implementation(kernel, torch.empty(1).device) == "triton"
    with force_implementation("torch"):  # what the fallback comparisons inside the tests rely on
        assert implementation(kernel, KERNEL_DEVICE) == "torch"
