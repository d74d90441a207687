"""PyTorch's attention kernels as trainers.attention runs them on CUDA (SDPA flash, varlen_attn, FlexAttention with
the document block mask, FlashAttention's varlen kernel with dropout, FA3 where torch can activate it), each
output and gradient within 1e-2 of a float64 reference (relative to its largest value), on causal rows and
on long-tail packed documents at real sizes, bf16, GQA. Run on the GPU machine: `python -m pytest tests/gpu -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_kernels_gpu import BF16, CUDA, _check_attention, assert_rel
from trainers.attention import (FA3, FLASH, FLASH_VARLEN_DROPOUT, FLEX, HOST_PATHS, ONE_ROW, PACKED_ROWS, VARLEN,
                                attention_by, batch_kind, choose_torch_attention, sdpa_attention, torch_features)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
FA3_HERE = torch_features().fa3 and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def long_tail_lengths(rows: int, row_len: int, seed: int = 0) -> list[int]:
    """Log-normal document lengths (median e^6 = 403) filling `rows` rows of `row_len`, two of length 1 first."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [1, 1]
    left = rows * row_len - 2
    while left:
        n = min(left, int(torch.empty(()).log_normal_(6.0, 1.5, generator=generator).clamp(1, row_len).item()))
        lengths.append(n)
        left -= n
    return lengths


def run_as_rows(impl: str, batch: int, seq: int, cu_seqlens: torch.Tensor | None, max_seqlen: int | None):
    """(T, H, D) tensors viewed as (B, S, H, D), the model's layout, through attention_by; back to (T, H, D)."""
    def run(q, k, v):
        out = attention_by(impl, *(t.view(batch, seq, *t.shape[1:]) for t in (q, k, v)), cu_seqlens=cu_seqlens,
                           max_seqlen=max_seqlen)
        return out.reshape(batch * seq, *out.shape[2:])
    return run


def inputs(tokens: int, heads: int, kv_heads: int, head_dim: int):
    q = torch.randn(tokens, heads, head_dim, device=CUDA, dtype=BF16)
    k, v = (torch.randn(tokens, kv_heads, head_dim, device=CUDA, dtype=BF16) for _ in range(2))
    return q, k, v


CAUSAL_IMPLS = [FLASH, FLEX] + ([FLASH + FA3] if FA3_HERE else [])
PACKED_IMPLS = [VARLEN, FLEX] + ([VARLEN + FA3] if FA3_HERE else [])


@pytest.mark.parametrize("impl", CAUSAL_IMPLS)
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim", [(2, 4096, 8, 2, 128), (1, 16384, 4, 1, 64),
                                                                (3, 1000, 8, 8, 128)])
def test_causal_rows(impl, batch, seq, heads, kv_heads, head_dim):
    q, k, v = inputs(batch * seq, heads, kv_heads, head_dim)
    rows = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=CUDA)
    _check_attention(run_as_rows(impl, batch, seq, None, None), q, k, v, rows, True)


@pytest.mark.parametrize("impl", PACKED_IMPLS)
@pytest.mark.parametrize("rows,head_dim", [(2, 128), (1, 64)], ids=["packed-rows", "one-packed-row"])
def test_long_tail_packed_documents(impl, rows, head_dim):
    seq = 8192
    lengths = long_tail_lengths(rows, seq)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    # documents crossing a row end are cut there, as trainers.data packs them: add every row start
    cu = torch.unique(torch.cat([cu, torch.arange(0, rows * seq + 1, seq, dtype=torch.int32, device=CUDA)]))
    q, k, v = inputs(rows * seq, 8, 2, head_dim)
    _check_attention(run_as_rows(impl, rows, seq, cu, int(cu.diff().max())), q, k, v, cu, True)


def test_the_model_path_picks_a_fused_kernel_for_every_batch():
    """sdpa_attention (model.attention = sdpa, and auto without verified Triton) on CUDA tensors: the choice for
    each batch kind, and its output equal to that kernel's."""
    q, k, v = (t.view(2, 512, *t.shape[1:]) for t in inputs(1024, 8, 2, 128))
    capability = torch.cuda.get_device_capability()
    for cu in (None, torch.tensor([0, 512, 1024], dtype=torch.int32, device=CUDA),
               torch.tensor([0, 100, 512, 700, 1024], dtype=torch.int32, device=CUDA)):
        impl, _ = choose_torch_attention("cuda", batch_kind(2, cu), capability=capability, dtype=BF16, head_dim=128,
                                         gqa=True)
        assert impl not in HOST_PATHS
        torch.testing.assert_close(sdpa_attention(q, k, v, cu_seqlens=cu, max_seqlen=512),
                                   attention_by(impl, q, k, v, cu_seqlens=cu, max_seqlen=512), atol=0, rtol=0)
    assert choose_torch_attention("cuda", ONE_ROW, capability=capability, gqa=True)[0].startswith(VARLEN)
    assert choose_torch_attention("cuda", PACKED_ROWS, capability=capability, dropout=0.1)[0] == FLASH_VARLEN_DROPOUT


def test_flash_varlen_with_dropout_regenerates_its_mask_in_backward():
    """Dropout has no float64 reference; what can go wrong is the backward using another mask than the forward.
    With the RNG state fixed the function is out = P_drop v, linear in v: so <dout, out> = <dv, v> exactly when
    the backward's mask is the forward's, and two runs from the same state agree bit for bit."""
    lengths = long_tail_lengths(1, 8192, seed=1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=CUDA)
    q, k, v = (t.view(1, 8192, *t.shape[1:]) for t in inputs(8192, 8, 2, 128))
    v = v.float().requires_grad_()

    def run():
        torch.manual_seed(7)
        return attention_by(FLASH_VARLEN_DROPOUT, q, k, v.to(BF16), cu_seqlens=cu, max_seqlen=max(lengths),
                            dropout_p=0.1)

    out = run()
    assert torch.equal(out, run())
    dout = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v, dout)
    lhs = (dout.double() * out.double()).sum()
    rhs = (dv.double() * v.double()).sum()
    assert_rel("<dout, out> against <dv, v>", lhs.reshape(1), rhs.reshape(1))
    assert not torch.equal(out, attention_by(VARLEN, q, k, v.to(BF16), cu_seqlens=cu, max_seqlen=max(lengths)))


def test_a_compiled_block_runs_the_chosen_kernel_as_eager_does():
    """parallel.compile: dynamo traces the choice (assume_constant_result) and calls the kernel in the graph; the
    logits under bf16 autocast match the eager model's for causal rows, packed rows and one packed row, and a
    new document count (a recompile, then dynamic sizes) too."""
    from trainers.config import ModelConfig
    from trainers.model import build_model, init_weights
    from trainers.parallel import apply_compile

    cfg = ModelConfig(vocab_size=256, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=1024)
    eager, compiled = (build_model(cfg, device="meta").to_empty(device=CUDA) for _ in range(2))
    for model in (eager, compiled):
        init_weights(model, cfg, seed=0)
    apply_compile(compiled)
    for rows, bounds in ((2, None), (2, [0, 100, 512, 700, 1024]), (1, [0, 5, 300, 512]), (1, [0, 200, 512])):
        tokens = torch.randint(0, 256, (rows, 512), device=CUDA)
        cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=CUDA)
        longest = None if cu is None else int(cu.diff().max())
        with torch.autocast("cuda", dtype=BF16):
            want = eager(tokens, None, cu, longest)
            got = compiled(tokens, None, cu, longest)
        assert_rel(f"logits, {rows} rows, boundaries {bounds}", got.detach(), want.detach().double())
