"""The token-by-token recurrence: the ground truth every other path is tested against.

    S_t = exp(-s) S_{t-1} + k_t^T v_t        o_t = q_t S_t

It runs in the state pool's dtype (float32, or float64 when a test passes a float64 pool),
one token at a time, so it is slow and only for tests.
"""
import torch

from .checks import check_args


def recurrent_prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens):
    """q, k, v [T, H, D]; slopes [H]; state_pool [S, H, D, D] (updated in place);
    state_slots [N] (-1: skip that sequence, zero output); cu_seqlens [N+1]. Returns o [T, H, D] in q's dtype."""
    check_args(q, k, v, slopes, state_pool, state_slots, cu_seqlens)
    acc = state_pool.dtype
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    decay = torch.exp(-slopes.to(acc))[:, None, None]
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(state_slots.tolist()):
        if slot < 0:
            continue
        state = state_pool[slot].clone()
        for t in range(bounds[i], bounds[i + 1]):
            kt, vt, qt = k[t].to(acc), v[t].to(acc), q[t].to(acc)
            state = decay * state + kt[:, :, None] * vt[:, None, :]
            out[t] = torch.einsum("hd,hde->he", qt, state)
        state_pool[slot] = state
    return out.to(q.dtype)


def recurrent_decode(q, k, v, slopes, state_pool, state_slots):
    """One token per sequence: q, k, v [N, H, D]; slot -1 marks padding (zero output, no update)."""
    check_args(q, k, v, slopes, state_pool, state_slots)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return recurrent_prefill(q, k, v, slopes, state_pool, state_slots, cu)
