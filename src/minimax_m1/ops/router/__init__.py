"""The MoE router: fp32 softmax over the gate's logits, the top-k experts, their weights renormalised to 1.

    route(x, weight, top_k) -> (weights [T, k] fp32, expert ids [T, k] int64)

x [T, H]; weight [E, H] the gate (x's dtype; the logits are F.linear's, in x's dtype, then fp32). Decode-sized
batches (T <= FUSED_MAX_TOKENS) on CUDA run the two kernels of cuda.py in place of the GEMM and the five torch
kernels of the reference (reference.py), which every other case runs. The kernels compute the same function:
their fp32 dot products, summed in another order than cuBLAS's, round to the same logits except where a sum lies
within fp32 rounding of a bf16 rounding step; the softmax repeats torch's (for E = 32 bit for bit); ties in the
top-k go to the lower expert id (torch leaves them unspecified).
"""
from __future__ import annotations

import torch

from . import cuda, reference

# Largest batch the fused kernels take (a policy; they serve any). Each logits CTA reads 4 x rows from L2 per
# 12 KB weight row, so the x traffic grows with T * E: at 64 tokens 25 MB of L2 reads, about what the GEMM and
# the torch kernels it replaces cost; measure with benchmarks/bench_fusions.py before raising it.
FUSED_MAX_TOKENS = 64


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2 and x.shape[0] <= FUSED_MAX_TOKENS and cuda.supports(x, weight, top_k):
        return cuda.route(x, weight, top_k)
    return reference.route(x, weight, top_k)


__all__ = ["route", "FUSED_MAX_TOKENS", "reference", "cuda"]
