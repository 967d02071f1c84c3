"""Projections of decode-sized batches: y = x W^T.

    linear(x, weight) -> y

x [..., K], weight [N, K]. For T <= MAX_TOKENS rows of x on CUDA in bf16/fp16, one GEMV kernel (cuda.py) that
streams the weight once at copy bandwidth, where cuBLAS at these shapes runs split-K with a reduction kernel
after; everything else is F.linear (the reference: CPU, fp32, prefill). Both sum in fp32 and round once; the
orders differ, so an output may differ from cuBLAS's by one ulp where the fp32 sums straddle a rounding step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cuda

# Largest row count the GEMV takes (a policy; the kernel serves up to cuda.limits()["max_tokens"]). At 1-4 rows
# it streams the weights with several loads in flight per lane; at 8 its registers allow one CTA per SM.
# benchmarks/bench_fusions.py measures it against F.linear at the model's shapes: set this from that table.
MAX_TOKENS = 4


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] <= MAX_TOKENS and cuda.supports(x, weight):
        return cuda.gemv(x, weight)
    return F.linear(x, weight)


__all__ = ["linear", "MAX_TOKENS", "cuda"]
