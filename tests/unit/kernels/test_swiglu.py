"""swiglu against float64: output, d gate and d up, across the 1024-element tile boundaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import force_implementation, swiglu
from tests.unit.kernels.checks import TOLERANCES, check_op


def swiglu_reference(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("shape", [(1,), (7, 129), (2, 3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_matches_float64(shape, dtype):
    gate, up = torch.randn(shape, dtype=dtype) * 4, torch.randn(shape, dtype=dtype)
    check_op(swiglu, swiglu_reference, [gate, up], [True, True], *TOLERANCES[dtype])


def test_torch_fallback_matches_float64():
    with force_implementation("torch"):
        check_op(swiglu, swiglu_reference, [torch.randn(5, 77), torch.randn(5, 77)], [True, True],
                 *TOLERANCES[torch.float32])


def test_mismatched_inputs_are_named():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(4, 8), torch.randn(4, 9))
