"""The routed experts of a sparse MoE layer, packed tokens.

    moe_experts(x, experts, weights, w13, w2) -> y

x [T, H]; experts [T, k] expert ids; weights [T, k] fp32 routing weights; w13 [E, 2I, H] (rows 0..I-1 gate w1,
I..2I-1 up w3) and w2 [E, H, I] in x's dtype. y[t] = sum_j weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) *
(w3[e] @ x[t])), e = experts[t, j], in x's dtype.

`moe_experts` dispatches: small batches (tokens * top_k <= FUSED_MAX_ROWS, CUDA, a dtype and sizes the kernels
serve) run the fused kernels of cuda.py, which stream each used expert's weights once; every other case runs the
grouped-GEMM torch path (grouped.py). `reference_experts` is the fp32 oracle both are tested against.
"""
from __future__ import annotations

import torch

from . import cuda
from .grouped import grouped_experts, grouped_mm, grouped_mm_capturable
from .reference import reference_experts

# Largest tokens * top_k for the fused kernels (a policy: the kernels take up to cuda.limits()["max_rows"]).
# benchmarks/bench_moe.py on an H200 (MiniMax-M1's layer, random router): fused / grouped-GEMM speedup 1.79x at
# 1 token, 1.47x at 64, 1.44x at 128, 1.18x at 256, 1.03x at 384, 0.75x at 512; with a skewed router (hot experts
# take several CTAs, each re-reading the weights) 1.11x at 128. 256 rows (128 tokens at top-2) keeps a margin for
# skewed routings.
FUSED_MAX_ROWS = 256


def use_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """Whether `moe_experts` runs the fused small-batch kernels for these tensors."""
    return x.shape[0] * top_k <= FUSED_MAX_ROWS and cuda.supports(x, w13, w2, top_k)


def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, foreign_ids: bool = False) -> torch.Tensor:
    """See the module docstring: the fused kernels where `use_fused`, else grouped GEMM. foreign_ids: some ids may
    lie outside [0, E) (another rank's experts under expert parallelism) and must contribute nothing; the fused
    kernels skip them always, the grouped path only when told (it costs a mask)."""
    if use_fused(x, w13, w2, experts.shape[1]):
        return cuda.moe_experts(x, experts, weights, w13, w2)
    return grouped_experts(x, experts, weights, w13, w2, foreign_ids)


def why_not_capturable(num_experts: int, hidden: int, inter: int, top_k: int, max_tokens: int, dtype: torch.dtype,
                       device: torch.device) -> str | None:
    """None when `moe_experts` of up to max_tokens tokens on this CUDA device can be captured in CUDA graphs,
    else why not: each batch must run the fused kernels or torch._grouped_mm (the loop over experts reads the
    routing on the host)."""
    if grouped_mm_capturable(hidden, inter, dtype, device):
        return None
    rows = max_tokens * top_k
    if rows <= FUSED_MAX_ROWS and cuda.available() and cuda.serves(num_experts, hidden, inter, rows, dtype):
        return None
    fused = cuda.load_error() or f"they take up to {FUSED_MAX_ROWS} rows, and these sizes and dtype: {cuda.limits()}"
    return (f"MoE batches of up to {rows} rows (tokens * top_k) in {dtype} need the fused kernels ({fused}) or "
            f"torch._grouped_mm (bf16 on sm_90+), and neither serves them here")


__all__ = ["moe_experts", "use_fused", "why_not_capturable", "reference_experts", "grouped_experts", "grouped_mm",
           "FUSED_MAX_ROWS"]
