"""Which of PyTorch's attention kernels runs where (trainers.attention.choose_torch_attention), asked for CUDA
on this CPU machine; and the CUDA paths that run on a CPU (FlexAttention with the document block mask)
against a float64 reference. The flash and varlen kernels themselves run only on a GPU: tests/gpu and
bench/gpu_suite.py check them there."""

import itertools
import math
import warnings

import pytest
import torch

from trainers.attention import (BATCH_KINDS, CAUSAL, FA3, FLASH, FLASH_VARLEN_DROPOUT, FLEX, HOST_PATHS, ONE_PER_ROW,
                                ONE_ROW, PACKED_ROWS, SDPA, SDPA_MASK, SDPA_PER_DOCUMENT, VARLEN, AttentionUnsupported,
                                TorchAttentionFeatures, _sdpa_host, attention_by, attention_choice, batch_kind,
                                cached_document_block_mask, choose_torch_attention, document_block_mask, document_ids,
                                sdpa_attention, torch_features)

TORCH_2_13 = TorchAttentionFeatures(frozenset({"window_size", "enable_gqa", "scale"}), flex=True, fa3=False)
FEATURES = {
    "2.13": TORCH_2_13,
    "2.13 + FA3": TorchAttentionFeatures(TORCH_2_13.varlen, flex=True, fa3=True),
    "2.10 varlen (no GQA)": TorchAttentionFeatures(frozenset({"is_causal"}), flex=True, fa3=False),
    "no varlen": TorchAttentionFeatures(None, flex=True, fa3=False),
    "varlen, no flex": TorchAttentionFeatures(TORCH_2_13.varlen, flex=False, fa3=False),
}


def test_cuda_never_runs_a_dense_mask_or_a_loop_over_documents():
    """Every batch kind, dropout, dtype, head dim, GPU and torch: a fused kernel, or a refusal that says what to
    change. The refusals are exactly attention dropout on packed documents where flash cannot run (no other
    fused kernel has dropout), and packed documents on a torch with neither varlen_attn nor FlexAttention."""
    refused = []
    for batch, dropout, gqa, dtype, head_dim, capability, features in itertools.product(
            BATCH_KINDS, (0.0, 0.1), (False, True), ("bfloat16", "float16", "float32"), (64, 128, 100, 512),
            (None, (7, 0), (8, 0), (9, 0), (10, 0)), FEATURES):
        case = (batch, dropout, gqa, dtype, head_dim, capability, features)
        try:
            impl, why = choose_torch_attention("cuda", batch, capability=capability, dtype=dtype, head_dim=head_dim,
                                               gqa=gqa, dropout=dropout, features=FEATURES[features])
        except AttentionUnsupported as err:
            refused.append(case)
            assert "model.dropout_attn = 0" in str(err) or "torch 2.10" in str(err), case
            continue
        assert impl not in HOST_PATHS and "mask" not in impl, case
        assert why, case
        if dropout:  # what runs has attention dropout
            assert impl.removesuffix(FA3) in (FLASH, FLASH_VARLEN_DROPOUT, SDPA) and FA3 not in impl, case
    flash_cannot = lambda dtype, head_dim, capability: (dtype == "float32" or head_dim > 256 or head_dim % 8
                                                        or capability == (7, 0))
    for batch, dropout, gqa, dtype, head_dim, capability, features in refused:
        assert batch in (PACKED_ROWS, ONE_ROW)
        assert (dropout and flash_cannot(dtype, head_dim, capability)) or features == "varlen, no flex"


@pytest.mark.parametrize("batch", [PACKED_ROWS, ONE_ROW])
def test_cuda_packed_documents_go_through_one_varlen_call(batch):
    bf16 = dict(capability=(9, 0), dtype="bfloat16", head_dim=128, gqa=True, features=TORCH_2_13)
    assert choose_torch_attention("cuda", batch, **bf16)[0] == VARLEN
    assert choose_torch_attention("cuda", batch, **{**bf16, "features": FEATURES["2.13 + FA3"]})[0] == VARLEN + FA3
    # FA3 has no dropout: FlashAttention-2's varlen kernel, called with it
    impl, why = choose_torch_attention("cuda", batch, **{**bf16, "dropout": 0.1, "features": FEATURES["2.13 + FA3"]})
    assert impl == FLASH_VARLEN_DROPOUT and "varlen_attn and FlexAttention have no attention dropout" in why
    # where varlen_attn cannot: FlexAttention with the document block mask
    assert choose_torch_attention("cuda", batch, **{**bf16, "dtype": "float32"})[0] == FLEX
    assert choose_torch_attention("cuda", batch, **{**bf16, "features": FEATURES["2.10 varlen (no GQA)"]})[0] == FLEX
    assert choose_torch_attention("cuda", batch, **{**bf16, "gqa": False,
                                                   "features": FEATURES["2.10 varlen (no GQA)"]})[0] == VARLEN
    with pytest.raises(AttentionUnsupported, match="train.dtype = bfloat16"):
        choose_torch_attention("cuda", batch, **{**bf16, "dtype": "float32", "dropout": 0.1})


@pytest.mark.parametrize("batch", [CAUSAL, ONE_PER_ROW])
def test_cuda_causal_rows_run_sdpa_flash_with_gqa(batch):
    impl, why = choose_torch_attention("cuda", batch, capability=(8, 0), gqa=True, features=TORCH_2_13)
    assert impl == FLASH and "is_causal with no mask, GQA without copying kv heads" in why
    assert choose_torch_attention("cuda", batch, capability=(9, 0), features=FEATURES["2.13 + FA3"])[0] == FLASH + FA3
    assert choose_torch_attention("cuda", batch, capability=(9, 0), dropout=0.1,
                                  features=FEATURES["2.13 + FA3"])[0] == FLASH  # flash has dropout, FA3 not
    assert choose_torch_attention("cuda", batch, dtype="float32", features=TORCH_2_13)[0] == FLEX
    assert choose_torch_attention("cuda", batch, dtype="float32", dropout=0.1, features=TORCH_2_13)[0] == SDPA


def test_the_cpu_choice_is_what_sdpa_attention_always_did():
    """Off CUDA: is_causal without documents, a dense mask for rows, one call per document of one packed row;
    and sdpa_attention on CPU tensors is bit for bit that implementation."""
    expected = {CAUSAL: SDPA, ONE_PER_ROW: SDPA_MASK, PACKED_ROWS: SDPA_MASK, ONE_ROW: SDPA_PER_DOCUMENT}
    for batch, impl in expected.items():
        for features in FEATURES.values():
            assert choose_torch_attention("cpu", batch, dropout=0.1, dtype="float32", features=features)[0] == impl
    torch.manual_seed(0)
    for lengths in ([[10], [10]], [[3, 7], [10]], [[3, 4, 3]]):
        b = len(lengths)
        q, k, v = torch.randn(b, 10, 4, 8), torch.randn(b, 10, 2, 8), torch.randn(b, 10, 2, 8)
        cu = cu_seqlens_of(lengths)
        kind = batch_kind(b, cu)
        impl = choose_torch_attention("cpu", kind)[0]
        assert torch.equal(sdpa_attention(q, k, v, cu_seqlens=cu), attention_by(impl, q, k, v, cu_seqlens=cu))
    assert batch_kind(2, None) == CAUSAL and batch_kind(2, cu_seqlens_of([[10], [10]])) == ONE_PER_ROW
    assert batch_kind(2, cu_seqlens_of([[3, 7], [10]])) == PACKED_ROWS
    assert batch_kind(1, cu_seqlens_of([[3, 7]])) == batch_kind(1, cu_seqlens_of([[10]])) == ONE_ROW


def test_the_model_level_choice_names_the_kernel_and_why():
    """What `flotilla plan` prints for model.attention: the kernel for the batch, and on CUDA why not Triton."""
    impl, why = attention_choice("auto", "cuda", (9, 0), batch=ONE_ROW, gqa=True)
    assert impl == (VARLEN + FA3 if torch_features().fa3 else VARLEN)
    assert "one packed row: varlen_attn" in why  # after why not Triton (kernels.choose's reason)
    impl, why = attention_choice("auto", "cuda", (9, 0), batch=PACKED_ROWS, dropout=0.1)
    assert impl == FLASH_VARLEN_DROPOUT
    impl, why = attention_choice("sdpa", "cpu", batch=ONE_ROW)
    assert impl == SDPA_PER_DOCUMENT and why.startswith("model.attention = sdpa: one packed row on cpu")


# ---------------------------------------------------------------- FlexAttention's document block mask


def cu_seqlens_of(doc_lengths: list[list[int]]) -> torch.Tensor:
    """Rows of document lengths (each row summing to S) -> int32 boundaries over the flattened tokens."""
    flat = [n for row in doc_lengths for n in row]
    return torch.tensor([0] + flat, dtype=torch.int32).cumsum(0, dtype=torch.int32)


LAYOUTS = {
    "packed rows": [[7, 1, 16], [24]],
    "one long packed row": [[5, 19, 1, 8, 7]],
    "long-tail, short last block": [[3, 30, 4], [1, 36]],
    "one document per row": [[24], [24]],
}


@pytest.mark.parametrize("lengths", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("block", [8, 16])
def test_document_block_mask_equals_create_block_mask(lengths, block):
    """Built tile by tile from the boundaries, the same tiles, full and partial, as FlexAttention's own
    create_block_mask evaluating the document mask token by token."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, s = len(lengths), sum(lengths[0])
    cu = cu_seqlens_of(lengths)
    doc = document_ids(cu, b, s)
    ours = document_block_mask(cu, b, s, block=block)
    theirs = create_block_mask(lambda bi, h, q, k: (doc[bi, q] == doc[bi, k]) & (q >= k), b, None, s, s,
                               device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)


def reference_attention(q, k, v, doc_ids):
    """Float64 softmax attention, mask spelled out: query i sees key j iff same document and j <= i.
    q (B, S, Hq, D), k/v (B, S, Hkv, D), doc_ids (B, S). Query head h uses kv head h // (Hq / Hkv)."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    k, v = k.double().repeat_interleave(group, dim=2), v.double().repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k) / math.sqrt(d)
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@pytest.mark.parametrize("lengths", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_flex_attention_matches_the_float64_reference(lengths, hq, hkv):
    """FlexAttention with the document block mask (uncompiled on a CPU: the same mask_mod and tiles the compiled
    CUDA kernel reads) against float64 attention with the mask spelled out; float32 inputs, within 1e-5. The
    forward pass only: FlexAttention has no backward on a CPU (torch 2.13); the GPU suite checks gradients."""
    torch.manual_seed(3)
    b, s, d = len(lengths), sum(lengths[0]), 16
    cu = cu_seqlens_of(lengths)
    q, k, v = (torch.randn(b, s, h, d) for h in (hq, hkv, hkv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = attention_by(FLEX, q, k, v, cu_seqlens=cu, max_seqlen=max(map(max, lengths)))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, document_ids(cu, b, s)), atol=1e-5,
                               rtol=1e-5)


def test_the_block_mask_is_built_once_per_batch():
    cu = cu_seqlens_of(LAYOUTS["packed rows"])
    first = cached_document_block_mask(cu, 2, 24, torch.device("cpu"))
    assert cached_document_block_mask(cu, 2, 24, torch.device("cpu")) is first  # the next layer, same batch
    assert cached_document_block_mask(cu.clone(), 2, 24, torch.device("cpu")) is not first  # the next batch


def test_only_the_fused_kernels_refuse_dropout_and_varlen_needs_boundaries():
    q = k = v = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="flex_attention has no attention dropout"):
        attention_by(FLEX, q, k, v, cu_seqlens=cu_seqlens_of([[8]]), dropout_p=0.1)
    with pytest.raises(ValueError, match="varlen_attn runs packed documents: it needs cu_seqlens"):
        attention_by(VARLEN, q, k, v)
    torch.testing.assert_close(attention_by(SDPA, q, k, v), _sdpa_host(q, k, v, cu_seqlens=None, dropout_p=0.0,
                                                                      softmax_scale=None))
