"""Causal softmax attention over a paged KV cache: the torch reference path.

kv_cache: [2, num_blocks, block_size, kv_heads, head_dim]; sequence i's tokens live in the blocks listed
in block_tables[i], token p at (block_tables[i][p // block_size], p % block_size).
"""
import inspect

import torch
import torch.nn.functional as F

from . import paged_attention_cuda


def _find_varlen():
    """PyTorch's flash-attention varlen kernel, and whether it reads a paged cache (block_table) itself."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "block_table" in params and "seqused_k" in params


_VARLEN, _VARLEN_PAGED = _find_varlen()


def paged_attention(q, kv_cache, batch, scale):
    """Causal attention of the batch's new tokens over their cached context (GQA: query head h reads kv
    head h // (Hq / Hkv)). On CUDA in bf16/fp16: PyTorch's flash-attention varlen kernel, one launch for the
    whole batch; where that torch cannot read a paged cache, the batch's context is first gathered into
    contiguous K/V (cheap next to prefill's arithmetic; decode uses the paged decode kernel when built).
    Elsewhere the torch reference. The flash kernel aligns the causal mask bottom-right: query j of a
    chunk of n new tokens sees the first context_len - n + j + 1 keys."""
    if _VARLEN is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if not _VARLEN_PAGED and batch.is_decode and paged_attention_cuda.supports(q, kv_cache):
            return paged_attention_cuda.paged_decode(q, kv_cache, batch.block_tables, batch.context_lens_t, scale,
                                                     batch.context_len_bound)
        cu_k = F.pad(batch.context_lens_t.cumsum(0, dtype=torch.int32), (1, 0))
        if _VARLEN_PAGED:
            return _VARLEN(q, kv_cache[0], kv_cache[1], batch.cu_seqlens, cu_k, batch.max_seqlen_q,
                           batch.context_len_bound, scale=scale, window_size=(-1, 0), enable_gqa=True,
                           seqused_k=batch.context_lens_t, block_table=batch.block_tables)
        k, v = _gather_context(kv_cache, batch, cu_k)
        return _VARLEN(q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen_q, batch.context_len_bound, scale=scale,
                       window_size=(-1, 0))
    return reference_paged_attention(q, kv_cache, batch.block_tables, batch.seq_lens, batch.context_lens, scale)


def _gather_context(kv_cache, batch, cu_k):
    """Every sequence's cached K and V, packed: ([sum context_lens, Hkv, D], same)."""
    block_size = kv_cache.shape[2]
    total = sum(batch.context_lens)
    n = batch.context_lens_t.shape[0]
    seq = torch.repeat_interleave(torch.arange(n, device=cu_k.device), batch.context_lens_t.long(),
                                  output_size=total)
    pos = torch.arange(total, device=cu_k.device) - cu_k[seq]
    flat = batch.block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    cache = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    return cache[0].index_select(0, flat), cache[1].index_select(0, flat)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, D] at flat positions slot_mapping [T] (block * block_size + offset)."""
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def reference_paged_attention(q, kv_cache, block_tables, seq_lens, context_lens, scale):
    """q [T, Hq, D] packed (sequence i owns seq_lens[i] rows; its new tokens are the last seq_lens[i] of
    its context_lens[i] cached tokens). Returns [T, Hq, D] in q's dtype. One SDPA call per sequence."""
    _, hq, d = q.shape
    block_size, hkv = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    start = 0
    for i, (n, ctx) in enumerate(zip(seq_lens, context_lens)):
        if n == 0:
            continue
        nblocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[i, :nblocks].long()
        k = kv_cache[0, blocks].reshape(-1, hkv, d)[:ctx]
        v = kv_cache[1, blocks].reshape(-1, hkv, d)[:ctx]
        qi = q[start:start + n].transpose(0, 1)  # [Hq, n, D]
        # query j (0-based among the new ones) sits at position ctx - n + j and sees keys 0..ctx-n+j
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(
            qi, k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
            attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
        out[start:start + n] = o.transpose(0, 1)
        start += n
    return out
