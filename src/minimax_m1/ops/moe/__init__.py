"""The routed experts of a sparse MoE layer, packed tokens.

    moe_experts(x, experts, weights, w13, w2) -> y

x [T, H]; experts [T, k] expert ids; weights [T, k] fp32 routing weights; w13 [E, 2I, H] (rows 0..I-1 gate w1,
I..2I-1 up w3) and w2 [E, H, I] in x's dtype. y[t] = sum_j weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) *
(w3[e] @ x[t])), e = experts[t, j], in x's dtype.

`moe_experts` dispatches: small batches (tokens * top_k <= FUSED_MAX_ROWS, CUDA, a dtype and sizes the kernels
serve) run the fused kernels of cuda.py, which stream each used expert's weights once; every other case runs the
grouped-GEMM torch path (grouped.py). `reference_experts` is the fp32 oracle both are tested against.

8-bit experts (quantized.py has the formats):

    moe_experts_quantized(x, experts, weights, w13, w13_scale, w2, w2_scale, method) -> y

w13/w2 int8 ("experts_int8") or float8_e4m3fn ("fp8") with per-output-channel fp32 scales w13_scale [E, 2I] and
w2_scale [E, H]. Small batches (FUSED_MAX_ROWS_QUANTIZED) run the fused kernel where it serves the call, asked as
`cuda.supports_quantized(x, w13, w2, top_k, method)` and run as
`cuda.moe_experts_quantized(x, experts, weights, w13, w13_scale, w2, w2_scale, method)`; for CUDA graphs,
`cuda.serves_quantized(num_experts, hidden, inter, rows, dtype, method)`. Every other case runs
quantized.quantized_experts (e4m3 tensor cores for fp8 on sm_90, else dequantise-then-grouped-GEMM);
`reference_quantized_experts` is their fp32 oracle.
"""
from __future__ import annotations

import torch

from . import cuda
from .grouped import grouped_experts, grouped_mm, grouped_mm_capturable
from .quantized import quantized_capturable, quantized_experts, reference_quantized_experts
from .reference import reference_experts

# Largest tokens * top_k for the fused kernels (a policy: the kernels take up to cuda.limits()["max_rows"]).
# benchmarks/bench_moe.py on an H200 (MiniMax-M1's layer, random router): fused / grouped-GEMM speedup 1.79x at
# 1 token, 1.47x at 64, 1.44x at 128, 1.18x at 256, 1.03x at 384, 0.75x at 512; with a skewed router (hot experts
# take several CTAs, each re-reading the weights) 1.11x at 128. 256 rows (128 tokens at top-2) keeps a margin for
# skewed routings.
FUSED_MAX_ROWS = 256
# 8-bit experts, per method. experts_int8's other CUDA path dequantises the whole layer each call, so the fused
# kernel wins wherever it runs (benchmarks/bench_quant.py, H200, MiniMax-M1's layer: 2.31 ms against 25.7 ms at
# 256 tokens, 3.91 against 25.8 at 512, where bf16 takes 3.84): up to the kernel's own limit. fp8's is
# _scaled_grouped_mm on e4m3 tensor cores, which the fused kernel beats only on small batches (0.56x of bf16's
# time at 256 tokens either way): the bf16 policy.
FUSED_MAX_ROWS_QUANTIZED = {"fp8": FUSED_MAX_ROWS, "experts_int8": None}  # None: cuda.limits()["max_rows"]


def _fused_max_rows_quantized(method: str) -> int:
    rows = FUSED_MAX_ROWS_QUANTIZED.get(method, FUSED_MAX_ROWS)
    if rows is not None:
        return rows
    return cuda.limits()["max_rows"] if cuda.available() else FUSED_MAX_ROWS


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


def use_fused_quantized(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                        w2_scale: torch.Tensor, method: str, top_k: int) -> bool:
    """Whether `moe_experts_quantized` runs the fused small-batch kernel for these tensors (the scales' shapes
    are checked by the kernel's launcher)."""
    return (cuda.supports_quantized(x, w13, w2, top_k, method)
            and x.shape[0] * top_k <= _fused_max_rows_quantized(method))


def moe_experts_quantized(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                          w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, method: str,
                          foreign_ids: bool = False) -> torch.Tensor:
    """8-bit experts (see the module docstring) -> [T, H] in x's dtype; foreign_ids as for moe_experts."""
    if use_fused_quantized(x, w13, w13_scale, w2, w2_scale, method, experts.shape[1]):
        return cuda.moe_experts_quantized(x, experts, weights, w13, w13_scale, w2, w2_scale, method)
    return quantized_experts(x, experts, weights, w13, w13_scale, w2, w2_scale, method, foreign_ids)


def why_not_capturable(num_experts: int, hidden: int, inter: int, top_k: int, max_tokens: int, dtype: torch.dtype,
                       device: torch.device, method: str | None = None) -> str | None:
    """None when `moe_experts` (method None) or `moe_experts_quantized` (method "fp8" / "experts_int8") of up
    to max_tokens tokens on this CUDA device can be captured in CUDA graphs, else why not: each batch must run
    the fused kernels or a grouped GEMM of torch (the loop over experts reads the routing on the host)."""
    if method is not None:
        return _why_not_capturable_quantized(num_experts, hidden, inter, top_k, max_tokens, dtype, device, method)
    if grouped_mm_capturable(hidden, inter, dtype, device):
        return None
    rows = max_tokens * top_k
    if rows <= FUSED_MAX_ROWS and cuda.available() and cuda.serves(num_experts, hidden, inter, rows, dtype):
        return None
    fused = cuda.load_error() or f"they take up to {FUSED_MAX_ROWS} rows, and these sizes and dtype: {cuda.limits()}"
    return (f"MoE batches of up to {rows} rows (tokens * top_k) in {dtype} need the fused kernels ({fused}) or "
            f"torch._grouped_mm (bf16 on sm_90+), and neither serves them here")


def _why_not_capturable_quantized(num_experts, hidden, inter, top_k, max_tokens, dtype, device, method):
    if quantized_capturable(method, hidden, inter, dtype, device):
        return None
    rows = max_tokens * top_k
    if (rows <= _fused_max_rows_quantized(method) and cuda.available()
            and cuda.serves_quantized(num_experts, hidden, inter, rows, dtype, method, device)):
        return None
    large = "torch._scaled_grouped_mm (bf16 on sm_90) or " if method == "fp8" else ""
    return (f"{method} MoE batches of up to {rows} rows (tokens * top_k) in {dtype} need the fused 8-bit kernel "
            f"or {large}torch._grouped_mm (bf16 on sm_90+), and none serves them here")


__all__ = ["moe_experts", "use_fused", "why_not_capturable", "reference_experts", "grouped_experts", "grouped_mm",
           "FUSED_MAX_ROWS", "FUSED_MAX_ROWS_QUANTIZED", "moe_experts_quantized", "use_fused_quantized", "quantized_experts",
           "reference_quantized_experts"]
