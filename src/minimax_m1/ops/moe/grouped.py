"""The routed experts by grouped GEMM in torch: the path for every batch the fused kernels do not take.

Rows (token, choice) are sorted by expert, each expert's rows go through w1/w3, silu(g) * u, then w2 as one
grouped GEMM each (torch._grouped_mm where it serves the dtype and device, else a loop over experts), and the
top-k products are weighted in fp32 and summed back per token (on CUDA by one kernel, cuda.combine_rows: torch's
weighting and index_add_ took 6% of a 32K-token prefill of the real-shape slice on an H200).
"""
from typing import Callable

import torch
import torch.nn.functional as F

from . import cuda


def _uses_grouped_mm(dtype: torch.dtype, device: torch.device, sizes) -> bool:
    """Whether torch._grouped_mm serves this dtype and device and these row lengths (x's and w's last two
    dims)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        # CUDA's grouped GEMM is bf16 on sm_90+ (Hopper) only
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] < 9:
            return False
    elif dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // dtype.itemsize  # every row stride a multiple of 16 bytes
    return all(n % align == 0 for n in sizes)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows grouped by expert), w [E, N, K], offsets [E] int32 (cumulative row ends) -> [M, N].
    Row r of group e is x[r] @ w[e]^T. Where torch._grouped_mm does not serve, a loop over the experts, which
    reads the offsets on the host."""
    if _uses_grouped_mm(x.dtype, x.device, (x.shape[-1], w.shape[-1], w.shape[-2])):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[1])
    ends = offsets.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out


def grouped_mm_capturable(hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether grouped_experts with these sizes on this CUDA device reads nothing on the host (torch._grouped_mm
    serves both products), so that a CUDA graph can capture it."""
    return device.type == "cuda" and _uses_grouped_mm(dtype, device, (hidden, 2 * inter, inter))


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """act = silu(g) * u of gate | up rows h [M, 2I], in h's dtype."""
    inter = h.shape[1] // 2
    return F.silu(h[:, :inter]) * h[:, inter:]


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, foreign_ids: bool = False) -> torch.Tensor:
    """x [T, H]; experts [T, k] expert ids in [0, E) (foreign_ids: ids outside it contribute nothing); weights
    [T, k] fp32; w13 [E, 2I, H] (rows 0..I-1 gate w1, I..2I-1 up w3), w2 [E, H, I] -> [T, H] in x's dtype (fp32
    weighting and sum, cast once)."""
    return grouped_moe(x, experts, weights, w13.shape[0],
                       lambda x, rows, offs: grouped_mm(x[rows], w13, offs),
                       lambda h, offs: grouped_mm(silu_mul(h), w2, offs), foreign_ids)


def grouped_moe(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int,
                up: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                down: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], foreign_ids: bool = False) -> torch.Tensor:
    """The grouped-GEMM MoE with its two products given: up(x, rows, offsets) -> [M, 2I] (gate | up) of the
    rows x[rows] (rows: int64 token of each sorted row; offsets [E] int32, cumulative row ends), down(h, offsets)
    -> [M, H] in x's dtype from those gate | up rows (the activation is down's). grouped_experts passes
    bf16/fp32 weights; ops/moe/quantized.py 8-bit ones."""
    tokens, top_k = experts.shape
    flat = experts.flatten()
    if foreign_ids:  # other ranks' experts sort last, into an extra bin E that no GEMM reads
        flat = torch.where((flat < 0) | (flat >= num_experts), num_experts, flat)
    order = flat.argsort(stable=True)
    token_of_row = order // top_k
    # a scatter rather than bincount: bincount reads its max back to the host, which CUDA graphs forbid
    counts = torch.zeros(num_experts + foreign_ids, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = counts[:num_experts].cumsum(0, dtype=torch.int32)
    y = down(up(x, token_of_row, offsets), offsets)
    if cuda.rows_serve(y) and y.dtype == x.dtype and y.dtype in (torch.bfloat16, torch.float16) and y.shape[1] % 8 == 0:
        pos = torch.empty_like(order)  # the sorted row of each (token, choice)
        pos[order] = torch.arange(order.numel(), device=order.device)
        if foreign_ids:  # rows past the last offset were not computed (undefined): skipped
            pos = torch.where(flat < num_experts, pos, -1)
        return cuda.combine_rows(y, pos.view(tokens, top_k), weights)
    y = y.float() * weights.flatten()[order, None]
    if foreign_ids:  # rows past the last offset were not computed (undefined): drop them
        y = torch.where((flat[order] < num_experts)[:, None], y, 0.0)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_of_row, y).to(x.dtype)
