"""fused_linear_cross_entropy against float64 F.cross_entropy(hidden @ weight.T): the loss and the gradients
of hidden and weight, over several chunks, ignored targets, both reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import force_implementation, fused_linear_cross_entropy
from tests.unit.kernels.checks import TOLERANCES, check_op

IGNORE = -100


def reference(reduction):
    def loss(hidden, weight, targets):
        logits = hidden @ weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                               reduction=reduction)
    return loss


def _inputs(shape, width, vocab, dtype, ignore_every=5):
    hidden = torch.randn(*shape, width, dtype=dtype)
    weight = (torch.randn(vocab, width) / width**0.5).to(dtype)
    targets = torch.randint(0, vocab, shape)
    if ignore_every:
        targets.view(-1)[2::ignore_every] = IGNORE
    return hidden, weight, targets


CASES = [
    # tokens shape, hidden, vocab, chunk size, dtype, reduction
    ((37,), 32, 300, 16, torch.float32, "mean"),
    ((64,), 48, 257, 64, torch.bfloat16, "sum"),
    ((1,), 16, 100, None, torch.float16, "mean"),
    ((2, 9), 32, 130, 4, torch.bfloat16, "mean"),  # (B, S, H) hidden, (B, S) targets
    ((19,), 16, 70, 1, torch.float32, "sum"),     # one token per chunk
]


@pytest.mark.parametrize("shape,width,vocab,chunk,dtype,reduction", CASES)
def test_matches_float64(shape, width, vocab, chunk, dtype, reduction):
    hidden, weight, targets = _inputs(shape, width, vocab, dtype)
    check_op(lambda h, w, t: fused_linear_cross_entropy(h, w, t, IGNORE, reduction, chunk), reference(reduction),
             [hidden, weight, targets], [True, True, False], *TOLERANCES[dtype])


def test_torch_fallback_matches_float64():
    hidden, weight, targets = _inputs((30,), 16, 90, torch.float32)
    with force_implementation("torch"):
        check_op(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=8), reference("mean"),
                 [hidden, weight, targets], [True, True, False], *TOLERANCES[torch.float32])


def test_frozen_weight_and_no_grad():
    hidden, weight, targets = _inputs((12,), 16, 50, torch.float32)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets), loss.detach())


def test_every_target_ignored():
    hidden, weight, _ = _inputs((6,), 16, 40, torch.float32)
    targets = torch.full((6,), IGNORE)
    hidden.requires_grad_()
    assert fused_linear_cross_entropy(hidden, weight, targets, reduction="mean").isnan()  # as F.cross_entropy
    loss = fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_bad_arguments_are_named():
    hidden, weight, targets = _inputs((6,), 16, 40, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(hidden, weight, targets[:5])
