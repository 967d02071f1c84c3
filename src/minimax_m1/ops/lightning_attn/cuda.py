"""Binding of the CUDA lightning-attention kernels (csrc/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_LIGHTNING_LIB` when set, else `minimax_m1/_kernels/liblightning_attn.so`
(built by `pip install`). It is loaded on first use; importing this module never fails: without the
library, tvm_ffi or a CUDA device, `available()` is False and `lightning_attn.prefill/decode` use the torch
reference. What the kernels serve (head dims, dtypes) is the library's `lightning_attn_limits()`.

The kernel calls are torch custom ops (`minimax_m1::lightning_prefill`, `minimax_m1::lightning_decode`)
that mutate `state_pool` and have fake implementations, so torch.compile sees through them; eager calls
skip the dispatcher (`_library.custom_op`). They run on torch's current stream; the prefill workspace
is allocated through torch's caching allocator (graph-safe), and nothing reads device memory on the host.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _library
from .._library import KernelLibrary, custom_op
from .checks import check_args

_LIBRARY = KernelLibrary("liblightning_attn.so", "MINIMAX_M1_LIGHTNING_LIB", "lightning_attn_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits


def serves(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the built kernels serve heads of this size in this dtype (False without the library)."""
    lim = _LIBRARY.limits_if_loaded()
    return lim is not None and head_dim in lim["head_dims"] and dtype in lim["dtypes"]


def supports(q: torch.Tensor, state_pool: torch.Tensor) -> bool:
    """Whether the kernels handle these tensors (else the caller uses the reference)."""
    return (
        q.is_cuda
        and q.dim() == 3
        and state_pool.dtype == torch.float32
        and state_pool.device == q.device
        and serves(q.shape[-1], q.dtype)
    )


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of the last dimension (16-byte chunks for bf16): copy only when needed."""
    # storage_offset rather than data_ptr: torch.compile traces this (allocations are 16-byte aligned)
    s0, s1, s2 = x.stride()
    if s2 != 1:
        return x.contiguous()
    if x.dtype == torch.bfloat16:
        n0, n1, _ = x.shape
        align = limits()["row_align_bytes"] // x.element_size()
        if (n0 > 1 and s0 % align) or (n1 > 1 and s1 % align) or x.storage_offset() % align:
            return x.contiguous()
    return x


def _kernel_inputs(q, k, v, state_pool):
    """Runs inside the custom ops (eagerly, also under torch.compile): copies only what the kernels need."""
    if not state_pool.is_contiguous():
        raise ValueError("state_pool must be contiguous (it is updated in place)")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    return _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)


@functools.lru_cache(maxsize=256)
def _workspace_bytes(tokens: int, seqs: int, heads: int, dim: int, split: bool, device: int, seg_len: int,
                     allow_sm90: bool) -> int:
    """The prefill workspace size (depends on the sizes and the device's multiprocessor count only)."""
    nbytes = _load().lightning_prefill_workspace_bytes(tokens, seqs, heads, dim, split, device, seg_len, allow_sm90)
    return max(int(nbytes), 16)


def _common(q, slopes, state_slots):
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    state_slots = state_slots.to(device=q.device, dtype=torch.int32).contiguous()
    return slopes, state_slots


def _prefill_impl(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, state_pool: Tensor, state_slots: Tensor,
                  cu_seqlens: Tensor, seg_len: int, allow_sm90: bool) -> Tensor:
    mod = _load()
    q, k, v = _kernel_inputs(q, k, v, state_pool)
    tokens, heads, dim = q.shape
    out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    split = q.dtype != torch.bfloat16
    nbytes = _workspace_bytes(tokens, state_slots.numel(), heads, dim, split, q.device.index, seg_len, allow_sm90)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    mod.lightning_prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens, out, workspace, seg_len, allow_sm90)
    return out


def _prefill_fake(q, k, v, slopes, state_pool, state_slots, cu_seqlens, seg_len, allow_sm90):
    return q.new_empty(q.shape)


_prefill_op = custom_op("minimax_m1::lightning_prefill", _prefill_impl, _prefill_fake, mutates_args=("state_pool",))


def _decode_impl(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, state_pool: Tensor, state_slots: Tensor,
                 silu: bool) -> Tensor:
    q, k, v = _kernel_inputs(q, k, v, state_pool)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _load().lightning_decode(q, k, v, slopes, state_pool, state_slots, out, silu, _library.FUSED_PDL)
    return out


def _decode_fake(q, k, v, slopes, state_pool, state_slots, silu):
    return q.new_empty(q.shape)


_decode_op = custom_op("minimax_m1::lightning_decode", _decode_impl, _decode_fake, mutates_args=("state_pool",))


def prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens, seg_len: int = 0, allow_sm90: bool | None = None):
    """Varlen prefill on the GPU; same contract as `naive.recurrent_prefill`.

    q, k, v [T, H, D] (bf16/fp16/fp32; views such as splits of a [T, H, 3D] tensor are read in place),
    slopes [H], state_pool [S, H, D, D] fp32 contiguous (updated in place), state_slots [N] (-1: padding),
    cu_seqlens [N+1]. `seg_len` > 0 forces the segment length (tests, tuning); 0 picks it from the GPU size.
    `allow_sm90` False keeps the mma.sync kernels where the Hopper ones could run (None: the
    MINIMAX_M1_LIGHTNING_SM90 switch). Returns o [T, H, D] in q's dtype. Tokens past cu_seqlens[N] are left
    unwritten.
    """
    check_args(q, k, v, slopes, state_pool, state_slots, cu_seqlens)
    slopes, state_slots = _common(q, slopes, state_slots)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    allow_sm90 = _library.LIGHTNING_SM90 if allow_sm90 is None else bool(allow_sm90)
    return _prefill_op(q, k, v, slopes, state_pool, state_slots, cu_seqlens, int(seg_len), allow_sm90)


def decode(q, k, v, slopes, state_pool, state_slots, silu: bool = False):
    """One token per sequence on the GPU: q, k, v [N, H, D]; slot -1 is padding (zero output, no update).
    silu: q, k, v are pre-activation and the kernel applies F.silu's arithmetic as it reads them."""
    check_args(q, k, v, slopes, state_pool, state_slots)
    slopes, state_slots = _common(q, slopes, state_slots)
    return _decode_op(q, k, v, slopes, state_pool, state_slots, bool(silu))
