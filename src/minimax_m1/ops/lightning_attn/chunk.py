"""Blocked (chunked) lightning attention in plain torch: the reference path used on CPU.

For a block of m tokens entering with state S (the state after the token before the block),
query offset c and key offset j (0-based within the block):
    intra:  sum_{j<=c} exp(-s (c-j)) (q_c . k_j) v_j
    inter:  exp(-s (c+1)) q_c S                  (c+1: the distance to the last token before the block)
    state:  S' = exp(-s m) S + sum_j exp(-s (m-1-j)) k_j^T v_j
Any block size gives the same result; the state and all arithmetic stay in the pool's dtype (fp32).
"""
import torch

from .checks import check_args

BLOCK = 256
SEGMENT_BLOCKS = 16  # blocks processed together; bounds the per-block state buffer to 16 x [H, D, D]


def _segment(q, k, v, slopes, state, block):
    """q, k, v [H, n, D] in the accumulation dtype; state [H, D, D]. Returns (o [H, n, D], new state)."""
    h, n, d = q.shape
    nb = (n + block - 1) // block
    pad = nb * block - n
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qb, kb, vb = (t.view(h, nb, block, d) for t in (q, k, v))
    s = slopes.to(q.dtype)[:, None, None]  # [H, 1, 1]
    idx = torch.arange(block, device=q.device, dtype=q.dtype)
    lengths = torch.full((nb,), block, device=q.device, dtype=q.dtype)
    lengths[-1] = block - pad

    # intra-block: causal, decayed by distance
    dist = idx[:, None] - idx[None, :]
    causal = dist >= 0
    intra_decay = torch.where(causal, torch.exp(-s * dist.clamp(min=0)), torch.zeros((), dtype=q.dtype, device=q.device))
    scores = (qb @ kb.transpose(-1, -2)) * intra_decay[:, None]  # [H, nb, B, B]
    out = scores @ vb

    # per-block state contribution, each key decayed to the block's last real token
    key_exp = (lengths[:, None] - 1 - idx[None, :]).clamp(min=0)  # padded keys are zero anyway
    kd = kb * torch.exp(-s[:, :, :, None] * key_exp[None, :, :, None])  # [H, nb, B, D]
    local = kd.transpose(-1, -2) @ vb  # [H, nb, D, D]
    block_decay = torch.exp(-s * lengths[None, None, :]).view(h, nb, 1, 1)

    incoming = []
    for b in range(nb):
        incoming.append(state)
        state = block_decay[:, b] * state + local[:, b]
    incoming = torch.stack(incoming, dim=1)  # [H, nb, D, D]

    query_decay = torch.exp(-s[:, :, :, None] * (idx + 1)[None, None, :, None])  # [H, 1, B, 1]
    out = out + (qb * query_decay) @ incoming
    return out.reshape(h, nb * block, d)[:, :n], state


def chunk_prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens, block: int = BLOCK):
    """Same contract as `naive.recurrent_prefill`, computed block by block."""
    check_args(q, k, v, slopes, state_pool, state_slots, cu_seqlens)
    acc = state_pool.dtype
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    seg = block * SEGMENT_BLOCKS
    for i, slot in enumerate(state_slots.tolist()):
        if slot < 0 or bounds[i + 1] == bounds[i]:
            continue
        state = state_pool[slot].to(acc)
        for a in range(bounds[i], bounds[i + 1], seg):
            b = min(a + seg, bounds[i + 1])
            qs, ks, vs = (t[a:b].to(acc).transpose(0, 1) for t in (q, k, v))
            # a segment shorter than a block is one block of its own length: a one-token row of a mixed
            # prefill/decode step must not cost a padded 256 x 256 block
            o, state = _segment(qs, ks, vs, slopes, state, min(block, b - a))
            out[a:b] = o.transpose(0, 1).to(q.dtype)
        state_pool[slot] = state
    return out


def chunk_decode(q, k, v, slopes, state_pool, state_slots):
    """One token per sequence, vectorised over the batch; slot -1 is padding (zero output, no update)."""
    check_args(q, k, v, slopes, state_pool, state_slots)
    acc = state_pool.dtype
    valid = state_slots >= 0
    slots = state_slots.long().clamp(min=0)
    state = state_pool[slots]  # [N, H, D, D]
    decay = torch.exp(-slopes.to(acc))[None, :, None, None]
    kt, vt, qt = k.to(acc), v.to(acc), q.to(acc)
    state = decay * state + kt[..., :, None] * vt[..., None, :]
    out = torch.einsum("nhd,nhde->nhe", qt, state)
    out = torch.where(valid[:, None, None], out, torch.zeros((), dtype=acc, device=q.device))
    if bool(valid.all()):
        state_pool[slots] = state
    else:
        state_pool[slots[valid]] = state[valid]
    return out.to(q.dtype)
