"""GPU tests run the compiled Triton kernels, verified or not: they are what verifies them
(kernels/verified.py), and `auto` would otherwise give the unverified ones PyTorch's fallbacks."""

import pytest

from kernels import force_implementation


@pytest.fixture(autouse=True)
def _triton_forced():
    with force_implementation("triton"):
        yield
