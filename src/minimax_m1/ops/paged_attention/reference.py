"""Causal softmax attention over a paged KV cache in plain torch: the reference path (CPU, and dtypes the
flash kernel does not take).

Memory grows linearly with the context: each sequence's new tokens are attended in chunks of queries, so one
SDPA call sees at most `MAX_SCORES` scores (heads x queries x keys; its mask is queries x keys) whatever the
context length; a chunk reads only the keys its last query sees.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SCORES = 1 << 24  # 64 MiB of fp32 scores per SDPA call (its softmax temporaries are a few times that)


def reference_paged_attention(q, kv_cache, block_tables, seq_lens, context_lens, scale, max_scores=MAX_SCORES):
    """q [T, Hq, D] packed (sequence i owns seq_lens[i] rows; its new tokens are the last seq_lens[i] of its
    context_lens[i] cached tokens); kv_cache [2, num_blocks, block_size, Hkv, D]; block_tables [N, max_blocks];
    seq_lens, context_lens: host lists. Returns [T, Hq, D] in q's dtype (GQA: query head h reads kv head
    h // (Hq / Hkv))."""
    _, hq, d = q.shape
    block_size, hkv = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    start = 0
    for i, (n, ctx) in enumerate(zip(seq_lens, context_lens)):
        if n == 0:
            continue
        blocks = block_tables[i, :-(-ctx // block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, hkv, d)[:ctx].transpose(0, 1).to(q.dtype)  # [Hkv, ctx, D]
        v = kv_cache[1, blocks].reshape(-1, hkv, d)[:ctx].transpose(0, 1).to(q.dtype)
        rows = max(1, max_scores // (hq * ctx))
        for a in range(0, n, rows):
            b = min(n, a + rows)
            # new query j sits at position ctx - n + j and sees keys 0..ctx-n+j; the chunk's last sees `keys`
            keys = ctx - n + b
            qpos = torch.arange(ctx - n + a, keys, device=q.device)[:, None]
            mask = torch.arange(keys, device=q.device)[None, :] <= qpos
            # a batch dimension of 1: 4-D inputs let torch pick its fused CPU kernel (the 3-D math path is ~6x slower)
            o = F.scaled_dot_product_attention(q[None, start + a:start + b].transpose(1, 2), k[None, :, :keys],
                                               v[None, :, :keys], attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
            out[start + a:start + b] = o[0].transpose(0, 1)
        start += n
    return out
