"""Causal softmax attention over a paged KV cache.

    paged_attention(q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q=..., max_seqlen_k=...,
                    is_decode=...) -> o
    write_kv(kv_cache, k, v, slot_mapping)

kv_cache: [2, num_blocks, block_size, kv_heads, head_dim]; sequence i's tokens live in the blocks listed in
block_tables[i], token p at (block_tables[i][p // block_size], p % block_size).

`paged_attention` dispatches: on CUDA in bf16/fp16, PyTorch's flash-attention varlen kernel (varlen.py), except
that decode steps use the CUDA paged decode kernel (cuda.py) where that torch cannot read a paged cache itself;
elsewhere the torch reference (reference.py). `why_not_capturable` says whether decode steps can be captured in
CUDA graphs, and `reserve_workspace` allocates the decode kernel's workspace before capture.
"""
from __future__ import annotations

import torch

from . import cuda, varlen
from .reference import reference_paged_attention


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, *, max_seqlen_q: int, max_seqlen_k: int, is_decode: bool,
                    seq_lens: list[int] | None = None, host_context_lens: list[int] | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context (the new tokens' K/V already
    written; GQA: query head h reads kv head h // (Hq / Hkv)).

    q [T, Hq, D], sequence i's new tokens rows cu_seqlens_q[i]:cu_seqlens_q[i+1] ([N+1] int32); context_lens
    [N] int32, its cached tokens after this step (the new ones are the last of them); block_tables
    [N, max_blocks] int32. Host side: max_seqlen_q / max_seqlen_k bound the new and cached lengths
    (max_seqlen_k also plans the decode kernel's splits: the engine passes max_model_len there), is_decode
    says every sequence brings one token; seq_lens / host_context_lens are the same lengths on the host where
    the caller has them (the reference loops over them; without them they are read from the device).
    Returns [T, Hq, D] in q's dtype.
    """
    if varlen.serves(q):
        if not varlen.PAGED and is_decode and cuda.supports(q, kv_cache):
            return cuda.paged_decode(q, kv_cache, block_tables, context_lens, scale, max_seqlen_k)
        total = None if host_context_lens is None else sum(host_context_lens)
        return varlen.varlen_paged_attention(q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                             max_seqlen_q, max_seqlen_k, total_context=total)
    if seq_lens is None:
        seq_lens = cu_seqlens_q.diff().tolist()
    if host_context_lens is None:
        host_context_lens = context_lens.tolist()
    return reference_paged_attention(q, kv_cache, block_tables, seq_lens, host_context_lens, scale)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, D] at flat positions slot_mapping [T] (block * block_size + offset)."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _uses_decode_kernel(num_q_heads, num_kv_heads, head_dim, block_size, dtype) -> bool:
    """Whether decode steps of these sizes run the CUDA paged decode kernel (see `paged_attention`)."""
    return (varlen.VARLEN is not None and dtype in varlen.DTYPES and not varlen.PAGED
            and cuda.available() and cuda.serves(num_q_heads, num_kv_heads, head_dim, block_size, dtype))


def why_not_capturable(num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> str | None:
    """None when decode steps over a CUDA cache of these sizes can be captured in CUDA graphs, else why not:
    the flash kernel must read the paged cache itself, or the paged decode kernel must serve the sizes (the
    other paths read lengths on the host)."""
    if dtype not in varlen.DTYPES:
        return f"{dtype} has no flash-attention path"
    if varlen.VARLEN is None:
        return f"torch {torch.__version__} has no flash-attention varlen kernel"
    if varlen.PAGED or _uses_decode_kernel(num_q_heads, num_kv_heads, head_dim, block_size, dtype):
        return None
    return (f"torch {torch.__version__} has no paged flash attention and the paged decode kernel does not serve "
            f"this model ({cuda.load_error() or 'head_dim, query heads per kv head or block size'})")


def reserve_workspace(kv_cache: torch.Tensor, num_q_heads: int, max_batch: int, max_context: int) -> None:
    """Allocate the decode kernel's workspace for every decode step of up to max_batch sequences of
    num_q_heads query heads over kv_cache (one layer's [2, num_blocks, block_size, Hkv, D]) with this
    max_context: call before CUDA graph capture, where nothing may be allocated. Nothing happens where decode
    steps of these sizes do not run the kernel."""
    _, _, block_size, hkv, d = kv_cache.shape
    if kv_cache.is_cuda and _uses_decode_kernel(num_q_heads, hkv, d, block_size, kv_cache.dtype):
        cuda.reserve(max_batch, num_q_heads, d, max_context, kv_cache.device)


__all__ = ["paged_attention", "write_kv", "reference_paged_attention", "why_not_capturable", "reserve_workspace"]
