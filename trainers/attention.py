"""Attention functions the model plugs in, chosen by name with `get_attention` (config `model.attention`).

Every function takes q (B, S, Hq, D) and k, v (B, S, Hkv, D) with Hq % Hkv == 0, returns (B, S, Hq, D), and
is causal. With `cu_seqlens` (int32 (n_docs+1,) document boundaries over the flattened B*S tokens, from 0 to
B*S, every row start b*S among them) a token attends only to earlier tokens of its own document, so packed
documents never see each other. `max_seqlen` (the longest document) is for varlen kernels; SDPA ignores it.

On CUDA tensors PyTorch's own kernels run, picked by `choose_torch_attention` (a pure function of the device,
the batch's kind, dropout, dtype, head dim and what the installed torch offers): SDPA's flash kernel for
causal rows, `varlen_attn` (FlashAttention's varlen kernel) for packed documents, FlexAttention with a
document block mask where those cannot run; FlashAttention-3 on Hopper where torch can activate it. Never a
dense mask or a loop over documents: those are the CPU's paths (CPU SDPA has no varlen kernel).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[..., Tensor]
log = logging.getLogger(__name__)


def document_ids(cu_seqlens: Tensor | None, batch: int, seq: int, device: torch.device | str | None = None) -> Tensor:
    """(B, S) the document (segment) of every token; without cu_seqlens each row is one document."""
    token = torch.arange(batch * seq, device=cu_seqlens.device if cu_seqlens is not None else device)
    if cu_seqlens is None:
        return (token // seq).view(batch, seq)
    # how many boundaries (after the leading 0) are <= the token's flat index
    return torch.searchsorted(cu_seqlens[1:].long(), token, right=True).view(batch, seq)


def document_mask(cu_seqlens: Tensor, batch: int, seq: int) -> Tensor:
    """(B, 1, S, S) bool, True where query i may attend key j: same document and j <= i."""
    doc = document_ids(cu_seqlens, batch, seq)
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (same_doc & causal)[:, None]


# ---------------------------------------------------------------- which PyTorch kernel runs

CAUSAL, ONE_PER_ROW, PACKED_ROWS, ONE_ROW = "causal rows", "one document per row", "packed rows", "one packed row"
BATCH_KINDS = (CAUSAL, ONE_PER_ROW, PACKED_ROWS, ONE_ROW)

SDPA = "sdpa"
"""SDPA with is_causal and no mask (GQA through enable_gqa); PyTorch picks the kernel."""
SDPA_MASK = "sdpa + document mask"
"""CPU: SDPA with a dense (B, 1, S, S) document mask, kv heads repeated."""
SDPA_PER_DOCUMENT = "sdpa per document"
"""CPU: one SDPA call per document of a packed row."""
FLASH = "sdpa flash"
"""SDPA held to its flash kernel: is_causal, no mask, GQA without copying kv heads."""
VARLEN = "varlen_attn"
"""torch.nn.attention.varlen.varlen_attn: FlashAttention's varlen kernel over the B*S tokens laid end to end."""
FLASH_VARLEN_DROPOUT = "flash varlen + dropout"
"""The kernel varlen_attn wraps (aten._flash_attention_forward), called with attention dropout, which
varlen_attn fixes at 0."""
FLEX = "flex_attention"
"""FlexAttention (compiled) with a causal or document block mask built once per batch."""
FA3 = " (FA3)"
"""Suffix: FlashAttention-3 kernels activated into the flash entry points (torch.nn.attention)."""
FUSED_ATTENTION = ("triton", FLASH, FLASH + FA3, VARLEN, VARLEN + FA3, FLASH_VARLEN_DROPOUT, FLEX)
"""Implementations that keep for backward q, k and v as they are (no repeated kv heads), the output and a
float32 log-sum-exp per head and token (orchestrator.plan's activation estimate)."""
HOST_PATHS = (SDPA_MASK, SDPA_PER_DOCUMENT)
"""The paths that cost the square of the row (dense mask) or a host sync and a launch per document: CPU only."""


class AttentionUnsupported(ValueError):
    """No fused PyTorch kernel runs this attention on CUDA (a dense mask is never chosen there instead)."""


@dataclass(frozen=True)
class TorchAttentionFeatures:
    """What the installed torch offers for attention (`torch_features()`); a parameter of the choice so a test
    can ask about another torch."""

    varlen: frozenset[str] | None
    """The parameters of torch.nn.attention.varlen.varlen_attn; None where this torch has none (before 2.10).
    2.10 takes `is_causal`; later versions `window_size` (causal is (-1, 0)), `enable_gqa` and `scale`."""
    flex: bool
    """torch.nn.attention.flex_attention exists (2.5 on)."""
    fa3: bool
    """FlashAttention-3 can be activated: torch registers 'FA3' (torch.nn.attention.list_flash_attention_impls)
    and its kernels (the flash_attn_interface module of flash-attention's hopper build) are installed."""


_FEATURES: TorchAttentionFeatures | None = None


def torch_features() -> TorchAttentionFeatures:
    """This process's torch, probed once. A module global rather than functools.cache: a compiled block reads
    it as a constant, where dynamo would trace the probe itself through a cache wrapper."""
    global _FEATURES
    if _FEATURES is None:
        _FEATURES = _probe_features()
    return _FEATURES


def _probe_features() -> TorchAttentionFeatures:
    try:
        from torch.nn.attention.varlen import varlen_attn
        varlen = frozenset(inspect.signature(varlen_attn).parameters)
    except ImportError:
        varlen = None
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    try:
        from torch.nn.attention import list_flash_attention_impls
        fa3 = "FA3" in list_flash_attention_impls() and importlib.util.find_spec("flash_attn_interface") is not None
    except ImportError:
        fa3 = False
    return TorchAttentionFeatures(varlen, flex, fa3)


def batch_kind(batch: int, cu_seqlens: Tensor | None) -> str:
    """The kind of batch (one of BATCH_KINDS) from shapes alone, without reading cu_seqlens (no device sync):
    n_docs + 1 boundaries with every row start among them means one document per row exactly when n_docs = B."""
    if cu_seqlens is None:
        return CAUSAL
    if batch == 1:
        return ONE_ROW
    return ONE_PER_ROW if cu_seqlens.numel() == batch + 1 else PACKED_ROWS


def _flash_cannot(capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why PyTorch's FlashAttention-2 kernels cannot take these inputs, or None where they can: they need an
    sm_80+ GPU, fp16/bf16 and a head dim that is a multiple of 8 up to 256 (sdp_utils' flash checks)."""
    if capability is not None and capability < (8, 0):
        return f"sm_{capability[0]}{capability[1]} (flash needs sm_80 or newer)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{str(dtype).removeprefix('torch.')} (flash takes float16 and bfloat16)"
    if head_dim % 8 or head_dim > 256:
        return f"head dim {head_dim} (flash takes multiples of 8 up to 256)"
    return None


def choose_torch_attention(device_type: str, batch: str, *, capability: tuple[int, int] | None = None,
                           dtype: torch.dtype | str = torch.bfloat16, head_dim: int = 128, gqa: bool = False,
                           dropout: float = 0.0,
                           features: TorchAttentionFeatures | None = None) -> tuple[str, str]:
    """(implementation, why): which of PyTorch's kernels causal attention over a batch of kind `batch`
    (BATCH_KINDS) runs on a `device_type` device. Pure: no tensor, no device; `capability` None means a GPU
    not known here (assumed able to run flash, and said so); `features` None means this process's torch.

    On CUDA never a dense mask or a per-document loop (HOST_PATHS): packed documents go through one varlen or
    FlexAttention call per layer. Raises AttentionUnsupported where no fused kernel takes the inputs (attention
    dropout on packed documents outside flash's dtypes and GPUs).
    """
    features = features or torch_features()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_type != "cuda":  # what sdpa_attention does off CUDA, unchanged
        if batch == CAUSAL:
            return SDPA, f"causal rows on {device_type}: SDPA, is_causal, no mask"
        if batch == ONE_ROW:
            return SDPA_PER_DOCUMENT, (f"one packed row on {device_type}: SDPA document by document (attention costs "
                                       "the sum of squared lengths, as the adaptive SP cost model assumes)")
        return SDPA_MASK, (f"{batch} on {device_type}: SDPA with a dense document mask ({device_type} has no varlen "
                           "kernel)")

    cannot = _flash_cannot(capability, dtype, head_dim)
    gpu = "GPU taken as sm_80+; " if capability is None else ""
    shared = ", GQA without copying kv heads" if gqa else ""
    fa3 = (cannot is None and not dropout and features.fa3 and capability is not None and capability[0] == 9)
    tag, fa = (FA3, "FlashAttention-3 (activated on sm_90)") if fa3 else ("", "FlashAttention-2")
    if batch in (CAUSAL, ONE_PER_ROW):
        if cannot is None:
            return FLASH + tag, f"{gpu}{batch}: SDPA's flash kernel ({fa}), is_causal with no mask{shared}"
        if dropout or not features.flex:
            return SDPA, (f"{batch}, flash cannot take {cannot}: SDPA is_causal, PyTorch picks the kernel"
                          + (" (FlexAttention has no attention dropout)" if dropout else ""))
        return FLEX, f"{batch}, flash cannot take {cannot}: FlexAttention with a causal block mask"

    # several documents in a row: their boundaries are data, so one varlen or block-sparse call per layer
    if dropout:
        if cannot is None:
            return FLASH_VARLEN_DROPOUT, (f"{gpu}{batch} with attention dropout: FlashAttention-2's varlen kernel "
                                          "with dropout (aten._flash_attention_forward; varlen_attn and "
                                          "FlexAttention have no attention dropout)")
        raise AttentionUnsupported(
            f"attention dropout on packed documents on CUDA with {cannot}: only FlashAttention's varlen "
            "kernel has both, and it cannot take that; set model.dropout_attn = 0, or train.dtype = bfloat16 on "
            "an sm_80+ GPU")
    varlen = features.varlen
    varlen_cannot = (cannot if cannot is not None
                     else "this torch has no torch.nn.attention.varlen (2.10 on)" if varlen is None
                     else "this torch's varlen_attn has no enable_gqa" if gqa and "enable_gqa" not in varlen
                     else None)
    if varlen_cannot is None:
        return VARLEN + tag, (f"{gpu}{batch}: varlen_attn ({fa}'s varlen kernel), the B*S tokens as one sequence "
                              f"of documents{shared}")
    if features.flex:
        return FLEX, f"{batch}, varlen_attn cannot ({varlen_cannot}): FlexAttention with a document block mask"
    raise AttentionUnsupported(f"packed documents on CUDA: varlen_attn cannot ({varlen_cannot}) and this torch has "
                               "no FlexAttention; use torch 2.10 or newer")


FLEX_BLOCK = 128
"""FlexAttention's sparse block size (its default, torch.nn.attention.flex_attention._DEFAULT_SPARSE_BLOCK_SIZE)."""


def document_block_mask(cu_seqlens: Tensor | None, batch: int, seq: int, device: torch.device | str | None = None,
                        block: int = FLEX_BLOCK):
    """FlexAttention's BlockMask for causal attention within documents (each row one document without
    cu_seqlens), from the boundaries one (block x block) tile at a time: O(B (S/block)^2) work and memory, never
    the (S, S) mask that create_block_mask evaluates uncompiled.

    Documents are contiguous runs of a row, so a block holds the documents [first, last]. A (query block, key
    block) tile is skipped where the key block lies after the query block or their documents do not meet; full
    (mask_mod skipped) where both lie inside one document and the key block is strictly earlier; partial
    otherwise. A last, short block is never full: mask_mod reads the padding as document -1, which meets none.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-seq // block)
    doc = document_ids(cu_seqlens, batch, seq, device)  # (B, S)
    index = torch.arange(n, device=doc.device)
    first = doc[:, index * block]  # (B, n): document of each block's first and last token
    last = doc[:, ((index + 1) * block).clamp(max=seq) - 1]
    # (B, n query blocks, n key blocks)
    meet = (first[:, None, :] <= last[:, :, None]) & (last[:, None, :] >= first[:, :, None])
    within = (first == last)[:, :, None] & (first == last)[:, None, :] & (first[:, :, None] == first[:, None, :])
    full = within & (index[None, :] < index[:, None])
    if n * block != seq:
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = meet & (index[None, :] <= index[:, None]) & ~full
    padded = torch.cat([doc, doc.new_full((batch, n * block - seq), -1)], dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] == padded[b, kv_idx]) & (q_idx >= kv_idx)

    def ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n, n) bool -> per query block the number of its key blocks and their indices first, with a head
        dimension of 1 (every head has the same mask)."""
        counts = tiles.sum(-1, dtype=torch.int32)
        indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None], indices[:, None]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq, seq))


_BLOCK_MASKS: dict[tuple, tuple[Tensor | None, object]] = {}
BLOCK_MASKS_KEPT = 8
"""Block masks kept, by batch: every layer of a step reuses its batch's mask; a pipeline stage's micro-batches
interleave, so the last few are kept, not only the last."""


@torch.compiler.disable
def cached_document_block_mask(cu_seqlens: Tensor | None, batch: int, seq: int, device: torch.device):
    """document_block_mask, built once per batch: every layer passes the batch's same cu_seqlens tensor, so its
    identity keys the cache (the entry holds the tensor, so the identity cannot be reused while cached)."""
    key = (None if cu_seqlens is None else id(cu_seqlens), batch, seq, str(device))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1]
    mask = document_block_mask(cu_seqlens, batch, seq, device)
    _BLOCK_MASKS[key] = (cu_seqlens, mask)
    while len(_BLOCK_MASKS) > BLOCK_MASKS_KEPT:
        del _BLOCK_MASKS[next(iter(_BLOCK_MASKS))]
    return mask


@functools.cache
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # uncompiled, FlexAttention materialises the whole (S, S) score matrix; compiled, it is one fused kernel
    return torch.compile(flex_attention)


def _flex(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, softmax_scale: float | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    batch, seq = q.shape[:2]
    mask = cached_document_block_mask(cu_seqlens, batch, seq, q.device)
    fn = flex_attention if torch.compiler.is_compiling() or not q.is_cuda else _compiled_flex_attention()
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=softmax_scale,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None,
            softmax_scale: float | None) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    b, s, hq, d = q.shape
    params = torch_features().varlen
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[2] != hq:
        kwargs["enable_gqa"] = True
    if softmax_scale is not None:
        kwargs["scale"] = softmax_scale
    cu = cu_seqlens.to(torch.int32)
    longest = max_seqlen or s  # an upper bound is correct: it sizes the kernel's grid of query blocks
    out = varlen_attn(q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d), cu, cu, longest,
                      longest, **kwargs)
    return out.view(b, s, hq, d)


class _FlashVarlenDropout(torch.autograd.Function):
    """FlashAttention-2's varlen kernel with attention dropout, through the aten ops varlen_attn wraps (which
    fixes dropout at 0): q (T, Hq, D), k/v (T, Hkv, D), causal within each document. The forward draws the
    dropout mask from a philox (seed, offset) it returns; the backward regenerates the same mask from them.
    Under activation checkpointing the recomputed forward draws the same, as checkpoint restores the RNG."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, scale):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.dropout_p, ctx.scale = max_seqlen, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen, ctx.max_seqlen, ctx.dropout_p, True, seed,
            offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def _flash_varlen_dropout(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int | None,
                          dropout_p: float, softmax_scale: float | None) -> Tensor:
    b, s, hq, d = q.shape
    out = _FlashVarlenDropout.apply(q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                                    cu_seqlens.to(torch.int32), max_seqlen or s, dropout_p, softmax_scale)
    return out.view(b, s, hq, d)


@torch.compiler.disable
def _select_flash(fa3: bool) -> None:
    """FlashAttention-3 into torch's flash entry points (SDPA flash, varlen_attn), or back to FlashAttention-2,
    which a call with attention dropout needs (FA3 refuses dropout). Process-wide: torch's dispatcher. Runs only
    where FA3 can be activated at all (torch_features().fa3); it breaks a compiled graph there, so the switch
    happens on every call, not once at tracing."""
    from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl
    from torch.nn.attention import restore_flash_attention_impl

    active = current_flash_attention_impl() == "FA3"
    if fa3 and not active:
        activate_flash_attention_impl("FA3")
    elif active and not fa3:
        restore_flash_attention_impl()


def attention_by(impl: str, q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                 max_seqlen: int | None = None, dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
    """Run the implementation `impl` (a choose_torch_attention answer) on q (B, S, Hq, D), k/v (B, S, Hkv, D):
    what sdpa_attention does once it has chosen, and what tests and bench/ call to run one kernel by name.
    flash and varlen need CUDA; FlexAttention runs uncompiled (the whole score matrix) off CUDA, for checks."""
    base = impl.removesuffix(FA3)
    if q.is_cuda and base in (FLASH, VARLEN) and torch_features().fa3:
        _select_flash(impl.endswith(FA3))
    if base == FLASH_VARLEN_DROPOUT and torch_features().fa3:
        _select_flash(False)
    if base == FLASH:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # held to flash: were it to fall back, the math kernel would hold every (S, S) score matrix
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return _sdpa_host(q, k, v, cu_seqlens=None, dropout_p=dropout_p, softmax_scale=softmax_scale)
    if base == SDPA:
        return _sdpa_host(q, k, v, cu_seqlens=None, dropout_p=dropout_p, softmax_scale=softmax_scale)
    if base in HOST_PATHS:
        return _sdpa_host(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p, softmax_scale=softmax_scale)
    if dropout_p and base != FLASH_VARLEN_DROPOUT:
        raise ValueError(f"{impl} has no attention dropout (dropout_p = {dropout_p})")
    if base == FLEX:
        return _flex(q, k, v, cu_seqlens, softmax_scale)
    if cu_seqlens is None:
        raise ValueError(f"{impl} runs packed documents: it needs cu_seqlens")
    if base == VARLEN:
        return _varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    if base == FLASH_VARLEN_DROPOUT:
        return _flash_varlen_dropout(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    raise ValueError(f"unknown attention implementation {impl!r}")


_reported: set[tuple] = set()


@torch.compiler.assume_constant_result
def _cuda_choice(device: torch.device, batch: str, dtype: torch.dtype, head_dim: int, gqa: bool,
                 dropout: bool) -> str:
    """choose_torch_attention for tensors on the CUDA `device`, logged with its reason the first time. Dynamo
    evaluates it once while tracing (its arguments are guarded shapes, dtypes and the dropout switch), so a
    compiled block calls the chosen kernel directly."""
    from kernels._triton import cuda_capability

    impl, why = choose_torch_attention("cuda", batch, capability=cuda_capability(device), dtype=dtype,
                                       head_dim=head_dim, gqa=gqa, dropout=float(dropout))
    if (impl, batch) not in _reported:
        _reported.add((impl, batch))
        log.info("attention on cuda: %s, %s", impl, why)
    return impl


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                   dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
    """Causal attention on PyTorch's own kernels; block-diagonal causal over documents when `cu_seqlens` is given.

    q: (B, S, Hq, D), k/v: (B, S, Hkv, D) -> (B, S, Hq, D). softmax_scale defaults to 1/sqrt(D). On CUDA the
    kernel choose_torch_attention picks for the batch (flash, varlen_attn, FlexAttention); elsewhere SDPA.
    """
    if q.is_cuda:
        # `True if ... else False`: a compiled graph then guards on the branch and passes a constant, where a
        # bare `dropout_p > 0` would be a symbolic bool once dynamo makes the rate dynamic (STN varies it)
        impl = _cuda_choice(q.device, batch_kind(q.shape[0], cu_seqlens), q.dtype, q.shape[-1],
                            q.shape[2] != k.shape[2], True if dropout_p > 0 else False)
        return attention_by(impl, q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p,
                            softmax_scale=softmax_scale)
    return _sdpa_host(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p, softmax_scale=softmax_scale)


def _sdpa_host(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None, dropout_p: float,
               softmax_scale: float | None) -> Tensor:
    """SDPA as the CPU runs it: is_causal without documents, one call per document of a single packed row
    (host sync on the boundaries), a dense document mask for rows."""
    batch, seq = q.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, S, D)
    if cu_seqlens is None:
        # enable_gqa lets each kv head serve Hq/Hkv query heads without copying it (flash kernel on CUDA)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=softmax_scale,
                                             enable_gqa=True)
    elif batch == 1:
        # One packed row (document batching, adaptive SP): each document on its own, so attention costs the
        # sum of their squared lengths, not the square of the row (what the adaptive SP cost model assumes)
        bounds = cu_seqlens.tolist()
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout_p,
                                                        is_causal=True, scale=softmax_scale, enable_gqa=True)
                         for a, b in zip(bounds[:-1], bounds[1:]) if b > a], dim=2)
    else:
        # With a mask, CUDA's only fused kernel is the memory-efficient one, which has no GQA: enable_gqa would
        # fall back to the math kernel and hold every (S, S) score matrix. Repeating kv heads keeps the fused
        # kernel (transformers' `use_gqa_in_sdpa` makes the same call).
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        mask = document_mask(cu_seqlens, batch, seq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None,
                     max_seqlen: int | None = None, dropout_p: float = 0.0, softmax_scale: float | None = None) -> Tensor:
    """Our Triton flash attention (kernels.flash_attn_varlen) on the B*S tokens laid end to end: cu_seqlens
    already lists every row start, so packed documents and rows are the kernel's documents as they are.
    The kernel has no attention dropout."""
    from kernels import flash_attn, flash_attn_varlen

    if dropout_p > 0:
        raise ValueError(f"model.attention = 'triton' has no attention dropout (model.dropout_attn = {dropout_p}); "
                         "set model.dropout_attn = 0, or use model.attention = 'sdpa'")
    if cu_seqlens is None:
        return flash_attn(q, k, v, causal=True, softmax_scale=softmax_scale)
    batch, seq = q.shape[:2]
    packed = (t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v))
    out = flash_attn_varlen(*packed, cu_seqlens, max_seqlen or seq, causal=True, softmax_scale=softmax_scale)
    return out.view(q.shape)


def auto_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Triton flash attention for CUDA tensors where the kernels layer runs it there (verified on this GPU,
    kernels/verified.py, or FLOTILLA_KERNELS=triton) and without attention dropout, which it lacks; PyTorch's
    kernels otherwise (sdpa_attention): on the CPU even an available Triton interpreter is far slower than SDPA."""
    from kernels import choose

    if q.is_cuda and not kwargs.get("dropout_p") and choose("flash_attn", q.device)[0] == "triton":
        return triton_attention(q, k, v, **kwargs)
    return sdpa_attention(q, k, v, **kwargs)


def attention_choice(name: str, device: torch.device | str, capability: tuple[int, int] | None = None, *,
                     batch: str = PACKED_ROWS, dtype: torch.dtype | str = torch.bfloat16, head_dim: int = 128,
                     gqa: bool = False, dropout: float = 0.0) -> tuple[str, str]:
    """(what `model.attention = name` runs for a batch of kind `batch` on `device`, why): 'triton', one of
    PyTorch's kernels (choose_torch_attention), or for 'triton' where the kernel falls back, 'torch fallback
    (per-document SDPA)'. capability: the CUDA compute capability it is for (None: this process's GPU, unknown
    where it has none; see kernels.choose). dtype, head_dim, gqa (fewer kv heads than query heads) and dropout
    (model.dropout_attn) are the model's; only whether dropout is > 0 matters."""
    from kernels import choose
    from kernels._triton import cuda_capability

    device_type = torch.device(device).type
    if device_type == "cuda" and capability is None:
        capability = cuda_capability(device)

    def torch_kernel() -> tuple[str, str]:
        return choose_torch_attention(device_type, batch, capability=capability, dtype=dtype, head_dim=head_dim,
                                      gqa=gqa, dropout=dropout)

    if name == "sdpa":
        impl, why = torch_kernel()
        return impl, f"model.attention = sdpa: {why}"
    kernel, kernel_why = choose("flash_attn", device, capability)
    if name == "auto":
        if device_type != "cuda":
            impl, why = torch_kernel()
            return impl, (f"model.attention = auto on {device_type}: SDPA (off CUDA, Triton runs only interpreted, "
                          f"far slower); {why}")
        if kernel == "triton" and not dropout:
            return "triton", kernel_why
        if kernel == "triton":
            kernel_why = f"model.dropout_attn = {dropout}: the Triton kernel has no attention dropout"
        impl, why = torch_kernel()
        return impl, f"{kernel_why}; {why}"
    return ("triton" if kernel == "triton" else "torch fallback (per-document SDPA)"), kernel_why


ATTENTION: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "auto": auto_attention, "triton": triton_attention}


def get_attention(name: str) -> AttentionFn:
    try:
        return ATTENTION[name]
    except KeyError:
        raise ValueError(f"model.attention={name!r} is unknown; allowed: {', '.join(sorted(ATTENTION))}") from None
