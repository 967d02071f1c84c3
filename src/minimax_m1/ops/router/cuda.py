"""Binding of the router kernels (csrc/router/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_ROUTER_LIB` when set, else `minimax_m1/_kernels/librouter.so` (built by
`pip install`), loaded on first use; without it, tvm_ffi or a CUDA device, `available()` is False and the
dispatch keeps the torch reference. What the kernels serve is the library's `router_limits()`.

`route` is the torch custom op `minimax_m1::route` (fake implementation included, so torch.compile sees through
it; eager calls skip the dispatcher). Two kernels on torch's current stream: the gate's logits (each expert's
weight row streamed once per 4 tokens, fp32 sums rounded to x's dtype, as F.linear rounds them), then per token
one warp's fp32 softmax, top-k and renormalisation; each a programmatic dependent launch on sm_90.
The logits workspace and the outputs come from torch's caching allocator; nothing is read on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("librouter.so", "MINIMAX_M1_ROUTER_LIB", "router_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits


def supports(x: Tensor, weight: Tensor, top_k: int) -> bool:
    """Whether the kernels take x [T, H] with the gate weight [E, H] (x's dtype) and this top_k."""
    lim = _LIBRARY.limits_if_loaded()
    if lim is None or not _library.FUSED_OPS or not x.is_cuda or x.dim() != 2 or weight.dim() != 2:
        return False
    e, h = weight.shape
    return (x.dtype in lim["dtypes"] and weight.dtype == x.dtype and weight.device == x.device
            and x.shape[1] == h and h % lim["hidden_multiple"] == 0 and 1 <= e <= lim["max_experts"]
            and 1 <= top_k <= min(e, lim["max_top_k"]))


def _route_impl(x: Tensor, weight: Tensor, top_k: int, pdl: bool) -> tuple[Tensor, Tensor]:
    align = limits()["row_align_bytes"]
    if x.stride(-1) != 1 or x.data_ptr() % align or (x.shape[0] > 1 and x.stride(0) % (align // x.element_size())):
        x = x.contiguous()
    tokens, experts = x.shape[0], weight.shape[0]
    logits = torch.empty((tokens, experts), dtype=torch.float32, device=x.device)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=x.device)
    _load().router_route(x, weight.contiguous(), logits, weights, ids, pdl)
    return weights, ids


def _route_fake(x, weight, top_k, pdl):
    shape = (x.shape[0], top_k)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int64)


_route_op = custom_op("minimax_m1::route", _route_impl, _route_fake)


def route(x: Tensor, weight: Tensor, top_k: int, pdl: bool | None = None) -> tuple[Tensor, Tensor]:
    """x [T, H] bf16/fp16, weight [E, H] x's dtype -> (weights [T, k] fp32, ids [T, k] int64): the reference's
    contract (ops/router/reference.py), ties broken towards the lower expert id. pdl: both kernels as
    programmatic dependent launch (None: the MINIMAX_M1_FUSED_PDL switch)."""
    pdl = _library.FUSED_PDL if pdl is None else bool(pdl)
    return _route_op(x, weight, int(top_k), pdl)
