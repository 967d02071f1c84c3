"""Projections of decode-sized batches: y = x W^T.

    linear(x, weight) -> y
    linear_parts(x, weights) -> [y_0, y_1, ...]   (several weights on the same x: one launch)

x [..., K], weight [N, K]. For T <= MAX_TOKENS rows of x and K >= MIN_K on CUDA in bf16/fp16, one GEMV kernel (cuda.py) that
streams the weight once at copy bandwidth, where cuBLAS at these shapes runs split-K with a reduction kernel
after; everything else is F.linear (the reference: CPU, fp32, prefill). Both sum in fp32 and round once; the
orders differ, so an output may differ from cuBLAS's by one ulp where the fp32 sums straddle a rounding step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cuda

# Where the GEMV runs (a policy; the kernel serves up to cuda.limits()["max_tokens"] rows), from
# benchmarks/bench_fusions.py on an H200 (per call in a CUDA graph, against F.linear): at 1-2 rows it wins for
# every weight with K >= 6144 (qkv 3072x6144 1.14-1.26x, k_proj 128x6144 2.2x, lm_head 25008x6144 1.06-1.08x,
# full out_proj 6144x8192 1.0-1.12x) and loses where K is 1024 (TP8 out_proj / o_proj 6144x1024: 0.81-0.97x); at 4
# rows it ties or loses (qkv 0.89x), at 8 it loses everywhere (0.46-0.57x).
MAX_TOKENS = 2
MIN_K = 4096


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The policy above: the kernel serves x and weight, and wins at their sizes."""
    return x.dim() == 2 and x.shape[0] <= MAX_TOKENS and weight.shape[-1] >= MIN_K and cuda.supports(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return cuda.gemv(x, weight) if _takes_gemv(x, weight) else F.linear(x, weight)


def linear_parts(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[linear(x, w) for w in weights]; where each would take the GEMV, one launch streams them all (a decode
    step's qkv and output gate, or q, k and v: the launch ramp costs about as much as a 12 MB weight)."""
    if (len(weights) > 1 and all(_takes_gemv(x, w) for w in weights)
            and len(weights) <= cuda.limits()["max_parts"]):  # limits() only once supports() found the library
        return cuda.gemv_parts(x, weights)
    return [linear(x, w) for w in weights]


__all__ = ["linear", "linear_parts", "MAX_TOKENS", "MIN_K", "cuda"]
