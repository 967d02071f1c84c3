"""Binding of the fused MoE expert kernels for small token counts (csrc/moe/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_MOE_LIB` when set, else `minimax_m1/_kernels/libmoe.so` (built by
`pip install`). It is loaded on first use; importing this module never fails: without the library, tvm_ffi or a
CUDA device, `available()` is False and callers keep the grouped-GEMM path. What the kernels serve (dtypes, the
most rows and experts of one call, the size multiple) is the library's `moe_limits()`.

`moe_experts` is a torch custom op (`minimax_m1::moe_experts`) with a fake implementation, so torch.compile and
CUDA graphs see through it; eager calls skip the dispatcher (`_library.custom_op`). It runs on torch's current
stream, never reads device memory on the host, and takes its workspaces from torch's caching allocator (inside
a graph capture, from the graph's pool): the routing is read on the device, so a captured call stays right for
any routing.

Each used expert's weights are streamed once (an expert with more routed rows than one CTA takes, see
`row_tiles`, once per group of rows), by three kernels: gate/up GEMV-like mma tiles writing
act = silu(x w1^T) * (x w3^T) (fp32 accumulation, act rounded once to x's dtype), down tiles writing each
(token, choice) row's fp32 result, and a combine that sums the top-k rows with their fp32 routing weights and
casts once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("libmoe.so", "MINIMAX_M1_MOE_LIB", "moe_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits


def serves(num_experts: int, hidden: int, inter: int, rows: int, dtype: torch.dtype) -> bool:
    """Whether the built kernels serve these sizes (rows = tokens * top_k) in this dtype (False without the
    library)."""
    lim = _LIBRARY.limits_if_loaded()
    return (lim is not None and dtype in lim["dtypes"] and hidden % lim["size_multiple"] == 0
            and inter % lim["size_multiple"] == 0 and inter > 0 and 1 <= num_experts <= lim["max_experts"]
            and rows <= lim["max_rows"])


def supports(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """Whether the kernels handle these shapes and dtypes (else the caller keeps its torch path)."""
    if not (x.is_cuda and x.dim() == 2 and w13.dim() == 3 and w2.dim() == 3):
        return False
    e, two_i, h = w13.shape
    i = two_i // 2
    return (w13.dtype == x.dtype and w2.dtype == x.dtype and w13.device == x.device and w2.device == x.device
            and x.shape[1] == h and tuple(w2.shape) == (e, h, i) and two_i == 2 * i and w13.is_contiguous()
            and w2.is_contiguous() and serves(e, h, i, x.shape[0] * top_k, x.dtype))


def _moe_experts_impl(x: Tensor, experts: Tensor, weights: Tensor, w13: Tensor, w2: Tensor, row_tiles: int,
                      pdl: bool) -> Tensor:
    tokens, hidden = x.shape
    rows, inter = tokens * experts.shape[1], w2.shape[2]
    out = torch.empty_like(x)
    act = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    partial = torch.empty((rows, hidden), dtype=torch.float32, device=x.device)
    _load().moe_experts(x, experts, weights, w13, w2, act, partial, out, row_tiles, pdl)
    return out


def _moe_experts_fake(x, experts, weights, w13, w2, row_tiles, pdl):
    return torch.empty_like(x)


_moe_experts_op = custom_op("minimax_m1::moe_experts", _moe_experts_impl, _moe_experts_fake)


def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                row_tiles: int = 0, pdl: bool | None = None) -> torch.Tensor:
    """Routed experts of a sparse MoE layer for small token counts.

    x [T, H] bf16/fp16; experts [T, k] int32/int64 expert ids (ids outside [0, E) contribute nothing);
    weights [T, k] routing weights (computed in fp32); w13 [E, 2I, H] (rows 0..I-1 gate w1, I..2I-1 up w3) and
    w2 [E, H, I], x's dtype, contiguous; H and I multiples of 64, T * k <= 1024, E <= 256 (`limits()`,
    see `supports`).
    Returns [T, H] in x's dtype: sum_j weights[t, j] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])), e =
    experts[t, j], with fp32 accumulation; the activation is rounded to x's dtype once, the k products are
    summed in fp32 and the sum is cast once. `row_tiles` (tuning): routed rows per CTA in units of 8 (1, 2
    or 4; 0 picks from the mean rows per used expert); an expert with more rows reads its weights once more
    per extra group of rows. `pdl` False launches the three kernels one after the other (no programmatic
    dependent launch; None: the MINIMAX_M1_MOE_PDL switch).
    """
    align = limits()["row_align_bytes"]
    if x.stride(-1) != 1 or x.data_ptr() % align or (x.shape[0] > 1 and x.stride(0) % (align // x.element_size())):
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    experts = experts.contiguous()
    if experts.dtype not in (torch.int32, torch.int64):
        experts = experts.long()
    weights = weights.to(torch.float32).contiguous()
    pdl = _library.MOE_PDL if pdl is None else bool(pdl)
    return _moe_experts_op(x, experts, weights, w13, w2, int(row_tiles), pdl)
