"""A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention.

Parameter names and the rotary convention match transformers' LlamaForCausalLM one to one (trainers.hf maps
the names). The model is built on the meta device (no memory, no init), parallelised, then materialised with
`to_empty` and filled by `init_weights`, whose values depend only on the seed, each parameter's name and the
element's index, never on how the parameter is sharded: every layout starts from the same weights.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import kernels
from trainers.attention import AttentionFn, get_attention
from trainers.config import ModelConfig


def kernel_choice(mode: str, kernel: str, device: torch.device | str,
                  capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """('triton' or 'torch', why): what `kernel` (kernels/) runs on plain tensors on `device` under
    model.kernels = mode. capability: the CUDA compute capability it is for (None: this process's GPU)."""
    if mode == "torch":
        return "torch", "model.kernels = torch"
    if mode == "auto" and torch.device(device).type != "cuda":
        # on a CPU, PyTorch beats even an available Triton interpreter
        return "torch", f"model.kernels = auto on {torch.device(device).type}"
    return kernels.choose(kernel, device, capability)


def use_kernel(mode: str, kernel: str, *tensors: Tensor) -> bool:
    """Whether `kernel` runs on these tensors; TP's DTensors keep the PyTorch code (the kernels take plain ones)."""
    if any(isinstance(t, DTensor) for t in tensors):
        return False
    return kernel_choice(mode, kernel, tensors[0].device)[0] == "triton"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel_mode: str = "torch"):
        super().__init__()
        self.eps, self.kernel_mode = eps, kernel_mode
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if use_kernel(self.kernel_mode, "rms_norm", x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        # normalise in float32: bf16's 8-bit mantissa loses the mean of squares of wide rows
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim) float32.

    Frequency i (of head_dim/2) is theta^(-2i/head_dim); the table repeats it over both halves of the head
    dim because `rotate_half` pairs dimension i with i + head_dim/2 (transformers' Llama layout, not Meta's
    interleaved pairs), so HF checkpoints load without permuting wq and wk.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, kernel_mode: str = "torch") -> Tensor:
    """x (B, S, H, D) rotated by cos, sin (B, S, 1, D) float32, returned in x's dtype. The products run in
    float32 so a bf16 q or k is rounded once, not twice (tables cast to bf16, then the products rounded)."""
    if use_kernel(kernel_mode, "rope", x):
        return kernels.rope(x, cos, sin)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attention_fn = attention_fn
        self.dropout_p = cfg.dropout_attn
        self.kernel_mode = cfg.kernels

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None) -> Tensor:
        b, s, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, s, self.n_heads, self.head_dim), cos, sin, self.kernel_mode)
        k = apply_rotary(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), cos, sin, self.kernel_mode)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        out = self.attention_fn(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                dropout_p=self.dropout_p if self.training else 0.0)  # (B, S, Hq, D)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.kernel_mode = cfg.kernels

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w1(x), self.w3(x)
        if use_kernel(self.kernel_mode, "swiglu", gate, up):
            return self.w2(kernels.swiglu(gate, up))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.attention = Attention(cfg, attention_fn)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.feed_forward = FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout_resid)
        self.recompute = False
        """Activation checkpointing (trainers.parallel.ac): keep only the block's input for backward and run
        the block again there. A flag rather than a wrapper module, so parameter names (which seed the
        initialisation and key the checkpoints) stay the same with and without it."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None) -> Tensor:
        if self.recompute and torch.is_grad_enabled():
            # non-reentrant: works with FSDP2 and DTensor, and restores the RNG so dropout masks repeat
            return checkpoint(self._block, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
        return self._block(x, cos, sin, cu_seqlens, max_seqlen)

    def _block(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None) -> Tensor:
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen))
        return x + self.resid_dropout(self.feed_forward(self.ffn_norm(x)))


def blocks(model: nn.Module) -> list[TransformerBlock]:
    """The transformer blocks of `model` (a whole Transformer or a pipeline stage's shard)."""
    return [module for module in model.modules() if isinstance(module, TransformerBlock)]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn | None = None):
        super().__init__()
        self.cfg = cfg
        attention_fn = attention_fn or get_attention(cfg.attention)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_dropout = nn.Dropout(cfg.dropout_embed)
        self.layers = nn.ModuleList(TransformerBlock(cfg, attention_fn) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernels)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: computed, never checkpointed. Free on meta; `to_empty` leaves them garbage, so
        # init_weights (or whoever materialises the model) calls reset_rope.
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> "Transformer":
        # Leaving the meta device gives each module a new Parameter, which would silently untie the output
        # projection from the embedding (each would then train on its own); tie them again.
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def reset_rope(self) -> None:
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """tokens (B, S) int64 -> logits (B, S, vocab) float32.

        positions (B, S) int64 index the rotary tables; they restart at 0 where a packed document starts
        (None: 0..S-1 in every row). cu_seqlens / max_seqlen: document boundaries, see trainers.attention.
        """
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        h = self.embed_dropout(self.tok_embeddings(tokens))  # (B, S, dim)
        cos = self.rope_cos[positions].unsqueeze(2)  # (B, S, 1, head_dim), broadcast over heads
        sin = self.rope_sin[positions].unsqueeze(2)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen)
        return self.output(self.norm(h)).float()


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", attention_fn: AttentionFn | None = None) -> Transformer:
    """On "meta" (the default) nothing is allocated or initialised: shard first, then `to_empty` + init_weights."""
    with torch.device(device):
        return Transformer(cfg, attention_fn)


def _param_seed(seed: int, name: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every rank must draw the same numbers
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


INIT_ROWS = 16
"""Rows per generator in init_weights: rows [16 b, 16 b + 16) of a parameter come from the generator seeded by
(seed, name, b). Small, so a shard whose rows start mid-block draws few rows it does not keep (at most 2 x 15);
large enough that seeding a generator (~2 us) is noise next to drawing 16 rows. Changing it changes every
initial weight."""


def _block_seed(seed: int, name: str, block: int) -> int:
    return (_param_seed(seed, name) * 1_000_003 + block) % 2**63


def draw_normal(seed: int, name: str, shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...],
                std: float) -> Tensor:
    """The box [offset, offset + size) of the N(0, std^2) tensor of `shape` that (seed, name) stands for,
    float32 on the CPU, drawing only the row blocks (INIT_ROWS) that overlap it, each whole.

    CPU generators, for every device: a CUDA rank draws the same numbers as a CPU rank (torch's CUDA generator
    is a different algorithm, so drawing on the device would tie the weights to the device type). A rank copies
    its box to the device itself: the host holds its shard and one block, never the whole tensor.
    """
    rows, first, end = shape[0], offset[0], offset[0] + size[0]
    whole_rows = tuple(size[1:]) == tuple(shape[1:])
    out = torch.empty(size)
    buffer = torch.empty(min(INIT_ROWS, rows), *shape[1:])  # for the blocks the box holds only part of
    for block in range(first // INIT_ROWS, -(-end // INIT_ROWS)):
        lo, hi = block * INIT_ROWS, min((block + 1) * INIT_ROWS, rows)
        gen = torch.Generator().manual_seed(_block_seed(seed, name, block))
        if whole_rows and first <= lo and hi <= end:
            # straight into place: a copy per block would be a small parallel op, slow on a loaded host
            torch.randn(hi - lo, *shape[1:], generator=gen, out=out[lo - first:hi - first])
            continue
        drawn = torch.randn(hi - lo, *shape[1:], generator=gen, out=buffer[:hi - lo])
        keep = drawn[max(lo, first) - lo:min(hi, end) - lo]
        for dim in range(1, len(shape)):  # a tensor-parallel Shard(1) rank keeps its columns of each row
            keep = keep.narrow(dim, offset[dim], size[dim])
        out[max(lo, first) - first:min(hi, end) - first] = keep
    return out.mul_(std)


@torch.no_grad()
def init_weights(model: Transformer, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter with values that depend only on (seed, name, element index): each rank draws, from
    CPU generators seeded by (seed, name, row block), only the rows of its shard (draw_normal) and copies them to
    its device. The same weights whatever the layout (FSDP's dim-0 shards, tensor parallelism's Shard(0) and
    Shard(1), both at once, or none), the same as a single process gets.

    Norm gains are 1; linear and embedding weights N(0, init_std), except the projections that write into
    the residual stream (wo, w2), whose std is divided by sqrt(2 * n_layers): the stream adds 2 * n_layers
    such outputs, so this keeps its variance at init independent of depth (GPT-2, Radford et al. 2019, sec. 2.3).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(f"init_weights needs a materialised model, but {on_meta[0]} (and {len(on_meta) - 1} more) "
                         "is on the meta device: call model.to_empty(device=...) first")
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    # named_parameters() yields a tied weight once, under its first name (tok_embeddings.weight)
    for name, param in sorted(model.named_parameters()):
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith("norm.weight"):
            local.fill_(1.0)
            continue
        shape = tuple(param.shape)
        if isinstance(param, DTensor):
            # the box of the global tensor this rank holds (DTensor's own arithmetic, as DCP uses it): FSDP2
            # and TP shards, and both composed, are contiguous boxes of rows (Shard(0)) and columns (Shard(1))
            size, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            if tuple(size) != tuple(local.shape):
                raise RuntimeError(f"init_weights: {name}'s local shard is {tuple(local.shape)}, but its placements "
                                   f"{param.placements} give {tuple(size)}")
        else:
            size, offset = shape, (0,) * len(shape)
        std = residual_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
        local.copy_(draw_normal(seed, name, shape, tuple(offset), tuple(size), std))
    model.reset_rope()


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count, tied weights once. exclude_embeddings drops the input embedding table (a lookup, no
    matmul); with tied embeddings that table is also the output projection, so it goes too."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.tok_embeddings.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022) appendix B: 6N + 12*L*H*Dh*S.

    N counts the weights of every matmul: attention and MLP projections plus the output projection, but not
    the input embedding (a lookup) nor norm gains (elementwise). 6N is 2 FLOPs per multiply-add, times 3 for
    forward, input-gradient and weight-gradient. 12*L*H*Dh*S is the attention scores (QK^T) and the weighted
    sum (PV), same 2*3 factor, over the full S*S square: causal masking's skipped half is counted, as PaLM does.
    """
    attention = cfg.dim * cfg.head_dim * 2 * (cfg.n_heads + cfg.kv_heads)  # wq, wo: dim x Hq*Dh; wk, wv: dim x Hkv*Dh
    mlp = 3 * cfg.dim * cfg.hidden_dim
    n = cfg.n_layers * (attention + mlp) + cfg.dim * cfg.vocab_size
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
