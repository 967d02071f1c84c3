"""Binding of the CUDA paged decode-attention kernel (csrc/paged_attention/, exported through apache-tvm-ffi).

The shared library is `$MINIMAX_M1_PAGED_ATTN_LIB` when set, else `minimax_m1/_kernels/libpaged_attn.so`
(built by `pip install`). It is loaded on first use; importing this module never fails: without the library,
tvm_ffi or a CUDA device, `available()` is False and callers keep the torch path. What the kernel serves (head
dims, dtypes, query heads per kv head, block sizes) is the library's `paged_attention_limits()`.

`paged_decode` is a torch custom op (`minimax_m1::paged_decode`) with a fake implementation, so torch.compile
and CUDA graphs see through it; eager calls skip the dispatcher (`_library.custom_op`). It runs on
torch's current stream and never reads device memory on the host.
Long contexts are split over several CTAs (flash-decoding); the number of splits depends on the batch size,
the head counts, `max_context` and the GPU only, so a captured graph stays right for any context lengths.
The splits' partial results go to one zero-initialised workspace buffer per device, cached here (one stream
at a time uses it, as the model's layers do): it grows on demand outside graph capture, and `reserve`
allocates it for the largest decode batch before any capture.
"""
from __future__ import annotations

import functools

import torch

from .._library import KernelLibrary, custom_op

_LIBRARY = KernelLibrary("libpaged_attn.so", "MINIMAX_M1_PAGED_ATTN_LIB", "paged_attention_limits")
_load, available, load_error, limits = _LIBRARY.load, _LIBRARY.available, _LIBRARY.load_error, _LIBRARY.limits
_workspaces: dict[int, torch.Tensor] = {}  # device index -> the current (largest) workspace
_retired: list[torch.Tensor] = []  # outgrown workspaces: graphs captured earlier may still point at them


def serves(num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> bool:
    """Whether the built kernel serves a cache of these sizes in this dtype (False without the library)."""
    lim = _LIBRARY.limits_if_loaded()
    return (lim is not None and dtype in lim["dtypes"] and head_dim in lim["head_dims"]
            and block_size % lim["block_size_multiple"] == 0 and num_kv_heads > 0 and num_q_heads % num_kv_heads == 0
            and num_q_heads // num_kv_heads <= lim["max_group"])


def supports(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these shapes and dtypes (else the caller keeps its torch path)."""
    if not (q.is_cuda and q.dim() == 3 and kv_cache.dim() == 5):
        return False
    hq, d = q.shape[1], q.shape[2]
    block_size, hkv = kv_cache.shape[2], kv_cache.shape[3]
    return (kv_cache.dtype == q.dtype and kv_cache.device == q.device and kv_cache.shape[4] == d
            and serves(hq, hkv, d, block_size, q.dtype))


def _device_index(device) -> int:
    device = torch.device(device) if device is not None else torch.device("cuda")
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=256)
def workspace_bytes(batch: int, num_q_heads: int, head_dim: int, max_context: int, device_index: int) -> int:
    """Workspace bytes enough for every decode of at most `batch` sequences with these sizes."""
    return int(_load().paged_decode_workspace_bytes(batch, num_q_heads, head_dim, max_context, device_index))


def num_splits(batch: int, num_kv_heads: int, head_dim: int, max_context: int, device=None) -> int:
    """CTAs per (sequence, kv head) that a decode with these sizes uses (1: no combine step)."""
    return int(_load().paged_decode_num_splits(batch, num_kv_heads, head_dim, max_context, _device_index(device)))


def _workspace(device_index: int, nbytes: int) -> torch.Tensor:
    ws = _workspaces.get(device_index)
    if ws is None or ws.numel() < nbytes:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"paged_decode needs a {nbytes}-byte workspace on cuda:{device_index} during CUDA graph capture; "
                "call minimax_m1.ops.reserve_workspaces(...) before capturing")
        if ws is not None:
            _retired.append(ws)
        # zeros: the kernel counts finished splits in the first bytes and leaves them zero after each launch
        ws = torch.zeros(max(nbytes, 16), dtype=torch.uint8, device=torch.device("cuda", device_index))
        _workspaces[device_index] = ws
    return ws


def reserve(max_batch: int, num_q_heads: int, head_dim: int, max_context: int, device=None) -> None:
    """Allocate the workspace for any decode of up to `max_batch` sequences whose `max_context` argument is
    this one (call before capturing CUDA graphs, where nothing may be allocated)."""
    index = _device_index(device)
    _workspace(index, workspace_bytes(max_batch, num_q_heads, head_dim, max_context, index))


def _paged_decode_impl(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context: int,
) -> torch.Tensor:
    batch, heads, dim = q.shape
    index = q.device.index
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    workspace = _workspace(index, workspace_bytes(batch, heads, dim, max_context, index))
    _load().paged_decode(q, kv_cache, block_tables, context_lens, out, workspace, scale, max_context)
    return out


def _paged_decode_fake(q, kv_cache, block_tables, context_lens, scale, max_context):
    return q.new_empty(q.shape)


_paged_decode_op = custom_op("minimax_m1::paged_decode", _paged_decode_impl, _paged_decode_fake)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, max_context: int) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    q [N, Hq, D] in a dtype and head dim the kernel serves (`limits()`: bf16/fp16, D 64 or 128); kv_cache
    [2, num_blocks, block_size, Hkv, D], q's dtype, block_size a multiple of `limits()["block_size_multiple"]`,
    Hq / Hkv in 1..`limits()["max_group"]` (query head h reads kv head h // (Hq / Hkv)); block_tables [N, max_blocks]
    int32; context_lens [N] int32, the keys to attend to with the new token's (already written) included.
    Returns softmax(q k^T * scale) v over keys 0..context_lens[i]-1 of sequence i, [N, Hq, D] in q's dtype
    (zeros where context_lens[i] == 0). `max_context` bounds the lengths for planning the splits (the
    engine's max_model_len); longer contexts are still exact.
    """
    align = limits()["row_align_bytes"]
    if q.stride(-1) != 1 or q.data_ptr() % align or any(q.stride(i) % (align // q.element_size())
                                                        for i in range(2) if q.shape[i] > 1):
        q = q.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    block_tables = block_tables.to(device=q.device, dtype=torch.int32)
    if block_tables.dim() == 2 and block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    context_lens = context_lens.to(device=q.device, dtype=torch.int32).contiguous()
    return _paged_decode_op(q, kv_cache, block_tables, context_lens, float(scale), int(max_context))
