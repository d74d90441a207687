"""Triton kernels for training, each with its autograd Function and a PyTorch fallback.

`implementation(kernel, device)` says which one runs ('triton' or 'torch'), `choose(kernel, device)` also why;
see kernels/_triton.py. On CUDA the default (`FLOTILLA_KERNELS=auto`) runs Triton only for the kernels
kernels/verified.py lists for the GPU.
"""

from kernels._triton import KERNELS, choose, force_implementation, implementation
from kernels.adamw import FusedAdamW
from kernels.attention import flash_attn, flash_attn_varlen
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.rmsnorm import rms_norm
from kernels.rope import rope
from kernels.swiglu import swiglu

__all__ = [
    "KERNELS",
    "FusedAdamW",
    "choose",
    "flash_attn",
    "flash_attn_varlen",
    "force_implementation",
    "fused_linear_cross_entropy",
    "implementation",
    "rms_norm",
    "rope",
    "swiglu",
]
