"""rms_norm against float64: output, d x and d weight, over row widths that are not powers of two."""

from __future__ import annotations

import pytest
import torch

from kernels import force_implementation, rms_norm
from tests.unit.kernels.checks import TOLERANCES, check_op

EPS = 1e-6


def rms_norm_reference(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


@pytest.mark.parametrize("shape", [(1, 16), (3, 7, 40), (129, 96), (2, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_float64(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    check_op(lambda x, w: rms_norm(x, w, EPS), rms_norm_reference, [x, weight], [True, True], *TOLERANCES[dtype])


def test_strided_rows():
    """Every other column of a wider tensor: the kernel reads a contiguous copy, gradients flow back."""
    wide = torch.randn(9, 64)
    check_op(lambda x, w: rms_norm(x[:, ::2], w, EPS), lambda x, w: rms_norm_reference(x[:, ::2], w),
             [wide, torch.randn(32)], [True, True], *TOLERANCES[torch.float32])


def test_matches_the_models_rmsnorm():
    from trainers.model import RMSNorm

    norm = RMSNorm(48, EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(4, 5, 48)
    torch.testing.assert_close(rms_norm(x, norm.weight, EPS), norm(x), atol=1e-6, rtol=1e-6)


def test_torch_fallback_matches_float64():
    x, weight = torch.randn(5, 33), torch.randn(33)
    with force_implementation("torch"):
        check_op(lambda x, w: rms_norm(x, w, EPS), rms_norm_reference, [x, weight], [True, True],
                 *TOLERANCES[torch.float32])


def test_bad_weight_is_named():
    with pytest.raises(ValueError, match=r"weight must be \(N,\)"):
        rms_norm(torch.randn(4, 8), torch.randn(7))
