"""Binding of the small-batch GEMV (csrc/gemv/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_GEMV_LIB` when set, else `minimax_m1/_kernels/libgemv.so` (built by
`pip install`), loaded on first use; without it, tvm_ffi or a CUDA device, `available()` is False and the
dispatch keeps F.linear. What the kernel serves is the library's `gemv_limits()`.

`gemv` is the torch custom op `minimax_m1::gemv`, `gemv_parts` (several weights on the same x, one launch)
`minimax_m1::gemv_parts` (fake implementations included; eager calls skip the dispatcher). One kernel on
torch's current stream: each weight row streamed once (16-byte loads, several in flight per lane), fp32 sums,
no split-K reduction kernel, a programmatic dependent launch on sm_90 (MINIMAX_M1_FUSED_PDL) that requests
its first weights before it waits for x; nothing read on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("libgemv.so", "MINIMAX_M1_GEMV_LIB", "gemv_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether the kernel takes x [T, K] (T <= max_tokens) and weight [N, K] (x's dtype, contiguous)."""
    lim = _LIBRARY.limits_if_loaded()
    if lim is None or not _library.FUSED_OPS or not x.is_cuda or x.dim() != 2 or weight.dim() != 2:
        return False
    return (x.dtype in lim["dtypes"] and weight.dtype == x.dtype and weight.device == x.device
            and x.shape[0] <= lim["max_tokens"] and x.shape[1] == weight.shape[1]
            and x.shape[1] % lim["k_multiple"] == 0 and weight.is_contiguous() and weight.data_ptr() % 16 == 0)


def _aligned_rows(x: Tensor) -> Tensor:
    """x, or a contiguous copy where its rows are not 16-byte aligned with a contiguous last dim."""
    align = limits()["row_align_bytes"]
    if x.stride(-1) != 1 or x.data_ptr() % align or (x.shape[0] > 1 and x.stride(0) % (align // x.element_size())):
        return x.contiguous()
    return x


def _gemv_impl(x: Tensor, weight: Tensor, ksplit: int) -> Tensor:
    x = _aligned_rows(x)
    y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _load().gemv(x, weight, y, ksplit, _library.FUSED_PDL)
    return y


def _gemv_fake(x, weight, ksplit):
    return x.new_empty((x.shape[0], weight.shape[0]))


_gemv_op = custom_op("minimax_m1::gemv", _gemv_impl, _gemv_fake)


def _gemv_parts_impl(x: Tensor, weights: list[Tensor], ksplit: int) -> list[Tensor]:
    x = _aligned_rows(x)
    ys = [torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device) for w in weights]
    pad = [weights[0], ys[0]] * (limits()["max_parts"] - len(weights))  # unused slots: any tensors
    _load().gemv_parts(x, *[t for w, y in zip(weights, ys) for t in (w, y)], *pad, len(weights), ksplit,
                       _library.FUSED_PDL)
    return ys


def _gemv_parts_fake(x, weights, ksplit):
    return [x.new_empty((x.shape[0], w.shape[0])) for w in weights]


_gemv_parts_op = custom_op("minimax_m1::gemv_parts", _gemv_parts_impl, _gemv_parts_fake)


def gemv_parts(x: Tensor, weights: list[Tensor], ksplit: int = 0) -> list[Tensor]:
    """[x w^T for w in weights] (1 to limits()["max_parts"] weights of the same K and dtype) in one launch: the
    weights' rows stacked, each product's sums as `gemv` gives them."""
    return _gemv_parts_op(x, list(weights), int(ksplit))


def gemv(x: Tensor, weight: Tensor, ksplit: int = 0) -> Tensor:
    """x [T, K] bf16/fp16, weight [N, K] -> x weight^T [T, N] in x's dtype (fp32 sums, rounded once). ksplit:
    warps per output row (1, 2, 4, 8), 0 automatic (tests, tuning)."""
    return _gemv_op(x, weight, int(ksplit))
