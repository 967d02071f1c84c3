"""Lightning attention (MiniMax's linear attention with per-head exponential decay), packed varlen API.

    prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens) -> o
    decode(q, k, v, slopes, state_pool, state_slots, silu=False) -> o

q, k, v: [T, H, D] packed tokens (decode: [N, H, D]), any float dtype; slopes: [H] fp32, already
multiplied by the layer factor; state_pool: [S, H, D, D] fp32, sequence i starts from
state_pool[state_slots[i]] and its final state is written back there (the caller zeroes a slot for a
new sequence); state_slots: [N] int32, -1 marks padding (zero output, no state update);
cu_seqlens: [N+1] int32. The output has q's dtype. decode's `silu` takes q, k, v before the layer's SiLU and
applies it (in the kernel as it loads them; F.silu's arithmetic, so the same values).

`prefill`/`decode` dispatch to the fastest implementation available for the tensors' device;
`reference_prefill`/`reference_decode` are the blocked torch path; `recurrent_*` the exact
token-by-token recurrence used as ground truth in tests. `why_not_capturable` says whether decode steps
can be captured in CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cuda
from .chunk import chunk_decode, chunk_prefill
from .naive import recurrent_decode, recurrent_prefill

reference_prefill = chunk_prefill
reference_decode = chunk_decode


def prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens):
    if cuda.supports(q, state_pool):
        return cuda.prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens)
    return reference_prefill(q, k, v, slopes, state_pool, state_slots, cu_seqlens)


def decode(q, k, v, slopes, state_pool, state_slots, silu: bool = False):
    """silu: q, k, v are the projection's raw output, SiLU is applied first (inside the kernel on CUDA)."""
    if cuda.supports(q, state_pool):
        return cuda.decode(q, k, v, slopes, state_pool, state_slots, silu)
    if silu:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    return reference_decode(q, k, v, slopes, state_pool, state_slots)


def why_not_capturable(head_dim: int, dtype: torch.dtype) -> str | None:
    """None when decode steps of layers with heads of this size in this dtype can be captured in CUDA graphs
    (the kernels serve them; the torch reference reads the state slots on the host), else why not."""
    if not cuda.available():
        return f"the lightning-attention CUDA kernels are not available ({cuda.load_error()})"
    limits = cuda.limits()
    if head_dim not in limits["head_dims"]:
        return f"the lightning kernels serve head_dim {limits['head_dims']}, not {head_dim}"
    if dtype not in limits["dtypes"]:
        return f"the lightning kernels serve {limits['dtypes']}, not {dtype}"
    return None


__all__ = [
    "prefill",
    "decode",
    "why_not_capturable",
    "reference_prefill",
    "reference_decode",
    "recurrent_prefill",
    "recurrent_decode",
]
