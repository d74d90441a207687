"""A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention.

Built on the meta device (no memory, no init), parallelised, then materialised with `to_empty` and
filled by `init_weights`, whose values depend only on the seed and each parameter's name, never on how
the parameter is sharded: every layout starts from the same weights.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.attention import AttentionFn, sdpa_attention
from trainers.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32: bf16's 8-bit mantissa loses the mean of squares of wide rows
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    """transformers' Llama convention: the head dim's two halves form the (real, imaginary) pairs."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attention_fn = attention_fn
        self.dropout = cfg.dropout_attn

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor | None, max_seqlen: int | None) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # cos/sin: (B, S, 1, D)
        out = self.attention_fn(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                dropout_p=self.dropout if self.training else 0.0)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attention_fn)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout_resid)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout_embed)
        self.layers = nn.ModuleList(TransformerBlock(cfg, attention_fn or sdpa_attention) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Rotary tables (max_seq_len, head_dim), float32, recomputed by init_weights (to_empty leaves garbage).
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)

    def reset_rope(self) -> None:
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(self.cfg.max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1).to(self.rope_cos.device)  # (S, D), halves repeated
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """tokens (B, S) -> logits (B, S, vocab) float32. positions (B, S) restart at each document."""
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        h = self.dropout(self.tok_embeddings(tokens))
        cos = self.rope_cos[positions].unsqueeze(2).to(h.dtype)  # (B, S, 1, D)
        sin = self.rope_sin[positions].unsqueeze(2).to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen)
        return self.output(self.norm(h)).float()


def build_model(cfg: ModelConfig, device: str | torch.device = "meta", attention_fn: AttentionFn | None = None) -> Transformer:
    with torch.device(device):
        return Transformer(cfg, attention_fn)


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@torch.no_grad()
def init_weights(model: Transformer, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter from a generator seeded by (seed, name), whole-tensor, then keep this rank's
    shard: the same weights whatever the layout. Output projections (wo, w2) get std / sqrt(2 * n_layers)
    so the residual stream's variance stays put as blocks add up (GPT-2's scaled init)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in sorted(model.named_parameters()):  # named_parameters already skips a tied duplicate
        if name.endswith("norm.weight"):
            full = torch.ones(param.shape)
        else:
            std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
            gen = torch.Generator().manual_seed(_param_seed(seed, name))
            full = torch.randn(param.shape, generator=gen) * std
        if isinstance(param, DTensor):
            # every rank made the same full tensor, so each keeps its own slice without communication
            local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)
    model.reset_rope()


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= model.tok_embeddings.weight.numel()
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N for the matmuls (N without the input embedding, a
    lookup) plus 12 * layers * heads * head_dim * seq_len for attention scores and values."""
    per_layer = cfg.dim * cfg.head_dim * (cfg.n_heads * 2 + cfg.kv_heads * 2) + 3 * cfg.dim * cfg.hidden_dim
    n = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
