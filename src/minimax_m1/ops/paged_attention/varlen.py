"""PyTorch's flash-attention varlen kernel over the paged KV cache: one launch for the whole batch.

Where that torch reads a paged cache itself (`PAGED`: varlen_attn takes block_table and seqused_k), the kernel
reads the blocks in place; elsewhere the batch's context is first gathered into contiguous K/V (cheap next to
prefill's arithmetic). The flash kernel aligns the causal mask bottom-right: query j of a chunk of n new tokens
sees the first context_len - n + j + 1 keys.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

DTYPES = (torch.bfloat16, torch.float16)  # what torch's flash kernel takes


def _find_varlen():
    """PyTorch's flash-attention varlen kernel, and whether it reads a paged cache (block_table) itself."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "block_table" in params and "seqused_k" in params


VARLEN, PAGED = _find_varlen()


def serves(q: torch.Tensor) -> bool:
    return VARLEN is not None and q.is_cuda and q.dtype in DTYPES


def varlen_paged_attention(q, kv_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q, max_seqlen_k,
                           total_context=None):
    """Same contract as `paged_attention` (CUDA, bf16/fp16). `total_context` (sum of context_lens, on the host)
    sizes the gather where torch cannot read the paged cache; without it the sum is read from the device."""
    cu_k = F.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
    if PAGED:
        return VARLEN(q, kv_cache[0], kv_cache[1], cu_seqlens_q, cu_k, max_seqlen_q, max_seqlen_k, scale=scale,
                      window_size=(-1, 0), enable_gqa=True, seqused_k=context_lens, block_table=block_tables)
    if total_context is None:
        total_context = int(context_lens.sum())
    k, v = _gather_context(kv_cache, block_tables, context_lens, cu_k, total_context)
    return VARLEN(q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, max_seqlen_k, scale=scale, window_size=(-1, 0))


def _gather_context(kv_cache, block_tables, context_lens, cu_k, total):
    """Every sequence's cached K and V, packed: ([sum context_lens, Hkv, D], same)."""
    block_size = kv_cache.shape[2]
    n = context_lens.shape[0]
    seq = torch.repeat_interleave(torch.arange(n, device=cu_k.device), context_lens.long(), output_size=total)
    pos = torch.arange(total, device=cu_k.device) - cu_k[seq]
    flat = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    cache = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    return cache[0].index_select(0, flat), cache[1].index_select(0, flat)
