"""Shared test setup.

Triton decides at decoration time whether a kernel is compiled or interpreted, so TRITON_INTERPRET must be
set before anything imports `kernels`: on a machine without CUDA every Triton kernel then runs through
Triton's CPU interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
