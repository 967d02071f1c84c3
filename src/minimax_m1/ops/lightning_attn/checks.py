"""Shape and dtype checks shared by every lightning-attention implementation.

Errors a caller can cause raise ValueError naming the argument; values inside device tensors
(slot indices, cu_seqlens) are not read here, since that would synchronise with the GPU.
"""
import torch


def check_args(q, k, v, slopes, state_pool, state_slots, cu_seqlens=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _, h, d = q.shape
    if slopes.shape != (h,):
        raise ValueError(f"slopes must be [{h}] (one per head), got {tuple(slopes.shape)}")
    if state_pool.dim() != 4 or state_pool.shape[1:] != (h, d, d):
        raise ValueError(f"state_pool must be [slots, {h}, {d}, {d}], got {tuple(state_pool.shape)}")
    if state_pool.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state_pool must be float32 (float64 for references), got {state_pool.dtype}")
    if state_slots.dim() != 1 or state_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_slots must be a 1-D int32 tensor, got {state_slots.dtype} {tuple(state_slots.shape)}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if cu_seqlens.numel() != state_slots.numel() + 1:
            raise ValueError(
                f"cu_seqlens must have one more entry than state_slots ({state_slots.numel() + 1}), "
                f"got {cu_seqlens.numel()}"
            )
    elif state_slots.numel() != q.shape[0]:
        raise ValueError(f"decode takes one token per slot: {q.shape[0]} tokens but {state_slots.numel()} slots")
