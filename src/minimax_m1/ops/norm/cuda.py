"""Binding of the RMSNorm kernels (csrc/norm/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_NORM_LIB` when set, else `minimax_m1/_kernels/libnorm.so` (built by
`pip install`), loaded on first use; without it, tvm_ffi or a CUDA device, `available()` is False and the
dispatch in __init__.py keeps the torch reference. What the kernels serve (dtypes, row lengths) is the library's
`norm_limits()`.

Each entry is a torch custom op (`minimax_m1::rms_norm`, ...) with a fake implementation, so torch.compile sees
through it; eager calls and CUDA graph captures skip the dispatcher (`_library.custom_op`). One CTA per row, the
row held in registers: one read of each input, one write of each output, on torch's current stream, launched as a
programmatic dependent of the kernel before on sm_90 (the MINIMAX_M1_FUSED_PDL switch); outputs come from
torch's caching allocator (inside a capture, from the graph's pool) and nothing is read on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("libnorm.so", "MINIMAX_M1_NORM_LIB", "norm_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits


def supports_rows(x: Tensor, *others: Tensor) -> bool:
    """Whether the kernels take x [..., n] and the other [..., n] inputs (x's dtype, shape and device)."""
    lim = _LIBRARY.limits_if_loaded()
    if lim is None or not _library.FUSED_OPS or not x.is_cuda or x.dim() < 1:
        return False
    n = x.shape[-1]
    return (x.dtype in lim["dtypes"] and 0 < n <= lim["max_features"] and n % lim["feature_multiple"] == 0
            and all(t.dtype == x.dtype and t.device == x.device and t.shape == x.shape for t in others))


def supports(x: Tensor, weight: Tensor, *others: Tensor) -> bool:
    """supports_rows, and a weight [n] in x's dtype on x's device."""
    return (supports_rows(x, *others) and weight.dtype == x.dtype and weight.device == x.device
            and tuple(weight.shape) == (x.shape[-1],))


def _rows(x: Tensor) -> Tensor:
    """x as [rows, n] with rows the kernels read in 16-byte vectors (a view where x already has that layout)."""
    x2 = x.reshape(-1, x.shape[-1])
    align = limits()["row_align_bytes"]
    if (x2.stride(-1) != 1 or x2.data_ptr() % align
            or (x2.shape[0] > 1 and x2.stride(0) % (align // x2.element_size()))):
        x2 = x2.contiguous()  # a fresh, aligned allocation
    return x2


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _load().norm_rms_norm(x2, weight.contiguous(), eps, out, _library.FUSED_PDL)
    return out.view(x.shape)


def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


def _add_rms_norm_impl(r: Tensor, a: Tensor, weight: Tensor, eps: float, alpha: float,
                       beta: float) -> tuple[Tensor, Tensor]:
    r2, a2 = _rows(r), _rows(a)
    h = torch.empty(r2.shape, dtype=r.dtype, device=r.device)
    out = torch.empty(r2.shape, dtype=r.dtype, device=r.device)
    _load().norm_add_rms_norm(r2, a2, weight.contiguous(), alpha, beta, eps, h, out, _library.FUSED_PDL)
    return h.view(r.shape), out.view(r.shape)


def _add_rms_norm_fake(r, a, weight, eps, alpha, beta):
    return torch.empty_like(r), torch.empty_like(r)


def _gated_rms_norm_impl(x: Tensor, gate: Tensor, weight: Tensor, sum_sq: Tensor, eps: float, size: int) -> Tensor:
    x2, g2 = _rows(x), _rows(gate)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _load().norm_gated_rms_norm(x2, g2, weight.contiguous(), sum_sq.reshape(-1), eps, size, out,
                                 _library.FUSED_PDL)
    return out.view(x.shape)


def _gated_rms_norm_fake(x, gate, weight, sum_sq, eps, size):
    return torch.empty_like(x)


def _sum_squares_impl(x: Tensor) -> Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _load().norm_sum_squares(x2, out, _library.FUSED_PDL)
    return out.view(x.shape[:-1])


def _sum_squares_fake(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


_rms_norm_op = custom_op("minimax_m1::rms_norm", _rms_norm_impl, _rms_norm_fake)
_add_rms_norm_op = custom_op("minimax_m1::add_rms_norm", _add_rms_norm_impl, _add_rms_norm_fake)
_gated_rms_norm_op = custom_op("minimax_m1::gated_rms_norm", _gated_rms_norm_impl, _gated_rms_norm_fake)
_sum_squares_op = custom_op("minimax_m1::sum_squares", _sum_squares_impl, _sum_squares_fake)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., n] bf16/fp16, weight [n] x's dtype -> w * x * rsqrt(mean(x^2) + eps), x's shape and dtype."""
    return _rms_norm_op(x, weight, float(eps))


def add_rms_norm(r: Tensor, a: Tensor, weight: Tensor, eps: float, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """r, a [..., n] -> (h = alpha * r + beta * a, rms_norm(h)); the products and the sum are rounded to the
    dtype as torch's arithmetic rounds them, so h is the reference's bit for bit."""
    return _add_rms_norm_op(r, a, weight, float(eps), float(alpha), float(beta))


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float, sum_sq: Tensor | None = None,
                   size: int | None = None) -> Tensor:
    """sigmoid(gate) * rms_norm(x), x and gate [..., n]; given sum_sq [...] fp32 (the all-reduced sums of
    squares over `size` features), the mean square is sum_sq / size."""
    if sum_sq is None:
        sum_sq, size = x.new_empty(0, dtype=torch.float32), x.shape[-1]
    else:
        sum_sq = sum_sq.to(torch.float32).contiguous()
    return _gated_rms_norm_op(x, gate, weight, sum_sq, float(eps), int(size))


def sum_squares(x: Tensor) -> Tensor:
    """x [..., n] -> [...] fp32 sums of x^2."""
    return _sum_squares_op(x)
