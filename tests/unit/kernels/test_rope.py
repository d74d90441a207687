"""rope against float64: output and d x, the model's table layout, broadcast and packed layouts, and tables
whose two halves differ (the general rotate_half formula, not only Llama's repeated frequencies)."""

from __future__ import annotations

import pytest
import torch

from kernels import force_implementation, rope
from tests.unit.kernels.checks import TOLERANCES, check_op


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x, cos, sin):
    if cos.dim() != x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def llama_tables(positions, head_dim, theta=10000.0):
    """cos, sin (*positions.shape, head_dim) float32, each frequency repeated over both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


CASES = [
    # x shape, how the tables are laid out, dtype
    ((2, 9, 3, 16), "model", torch.float32),       # (B, S, 1, D), as trainers.model builds them
    ((2, 17, 8, 64), "model", torch.bfloat16),
    ((1, 129, 1, 128), "model", torch.float16),
    ((3, 5, 4, 32), "per-sequence", torch.bfloat16),  # (S, D), broadcast over the batch
    ((40, 6, 16), "packed", torch.float32),        # (T, H, D) with (T, D): positions restart per document
    ((2, 7, 2, 24), "general", torch.float32),     # independent angles for every dim, halves differ
]


def _tables(shape, layout):
    batch_seq, head_dim = shape[:-2], shape[-1]
    if layout == "model":
        cos, sin = llama_tables(torch.arange(batch_seq[1]).expand(batch_seq), head_dim)
        return cos.unsqueeze(2), sin.unsqueeze(2)
    if layout == "per-sequence":
        return llama_tables(torch.arange(batch_seq[1]), head_dim)
    if layout == "packed":
        positions = torch.cat([torch.arange(n) for n in (1, 30, 9)])
        return llama_tables(positions, head_dim)
    angles = torch.randn(*batch_seq, 1, head_dim) * 3
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("shape,layout,dtype", CASES)
def test_rope_matches_float64(shape, layout, dtype):
    cos, sin = _tables(shape, layout)
    x = torch.randn(shape, dtype=dtype)
    check_op(rope, rope_reference, [x, cos, sin], [True, False, False], *TOLERANCES[dtype])


def test_matches_the_models_rotation():
    from trainers.model import apply_rotary

    cos, sin = _tables((2, 11, 4, 32), "model")
    x = torch.randn(2, 11, 4, 32)
    torch.testing.assert_close(rope(x, cos, sin), apply_rotary(x, cos, sin), atol=1e-6, rtol=1e-6)


def test_torch_fallback_matches_float64():
    cos, sin = _tables((2, 9, 3, 16), "model")
    with force_implementation("torch"):
        check_op(rope, rope_reference, [torch.randn(2, 9, 3, 16), cos, sin], [True, False, False],
                 *TOLERANCES[torch.float32])


@pytest.mark.parametrize("cos_shape,message", [((9, 15), "last dim"), ((4, 9, 16), "broadcast")])
def test_bad_tables_are_named(cos_shape, message):
    with pytest.raises(ValueError, match=message):
        rope(torch.randn(2, 9, 3, 16), torch.randn(cos_shape), torch.randn(cos_shape))
