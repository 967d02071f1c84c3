"""Binding of the rotary + KV-store kernel (csrc/rotary/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_ROTARY_LIB` when set, else `minimax_m1/_kernels/librotary.so` (built by
`pip install`), loaded on first use; without it, tvm_ffi or a CUDA device, `available()` is False and the
dispatch keeps the torch reference. What the kernel serves is the library's `rotary_limits()`.

`rotary_write_kv` is the torch custom op `minimax_m1::rotary_write_kv` (it mutates kv_cache; fake implementation
included, eager calls skip the dispatcher). One CTA per token on torch's current stream, nothing read on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("librotary.so", "MINIMAX_M1_ROTARY_LIB", "rotary_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits


def _heads_ok(t: Tensor, dtype: torch.dtype, device) -> bool:
    """[T, heads, D] of dtype on device, each token's heads contiguous, rows at 16-byte multiples."""
    if t.dim() != 3 or t.dtype != dtype or t.device != device or t.stride(2) != 1:
        return False
    n_t, h, d = t.shape
    align = limits()["row_align_bytes"] // t.element_size()
    return ((h == 1 or t.stride(1) == d) and (n_t <= 1 or t.stride(0) % align == 0)
            and t.storage_offset() % align == 0)


def supports(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, kv_cache: Tensor) -> bool:
    """Whether the kernel takes these tensors (else the caller keeps the torch reference)."""
    lim = _LIBRARY.limits_if_loaded()
    if lim is None or not _library.FUSED_OPS or not q.is_cuda or q.dtype not in lim["dtypes"] or cos.dim() != 2:
        return False
    mult, d, rd = lim["head_dim_multiple"], q.shape[-1], cos.shape[-1]
    return (d % mult == 0 and rd % (2 * mult) == 0 and 0 < rd <= d and cos.dtype == torch.float32
            and kv_cache.dtype == q.dtype and kv_cache.device == q.device and kv_cache.is_contiguous()
            and kv_cache.dim() == 5 and tuple(kv_cache.shape[3:]) == (k.shape[1], d)
            and all(_heads_ok(t, q.dtype, q.device) for t in (q, k, v)))


def _rotary_write_kv_impl(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor,
                          slot_mapping: Tensor) -> Tensor:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _load().rotary_write_kv(q, k, v, cos.contiguous(), sin.contiguous(), kv_cache, slot_mapping.contiguous(), q_out,
                            _library.FUSED_PDL)
    return q_out


def _rotary_write_kv_fake(q, k, v, cos, sin, kv_cache, slot_mapping):
    return torch.empty_like(q)


_rotary_write_kv_op = custom_op("minimax_m1::rotary_write_kv", _rotary_write_kv_impl, _rotary_write_kv_fake,
                                mutates_args=("kv_cache",))


def rotary_write_kv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor,
                    slot_mapping: Tensor) -> Tensor:
    """See ops/rotary: the reference's contract bit for bit (the same fp32 products and sums, rounded once)."""
    return _rotary_write_kv_op(q, k, v, cos, sin, kv_cache, slot_mapping)
