"""What one model step needs to know about the packed batch it runs on."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ForwardBatch:
    """N sequences packed into T tokens. Sequence i's new tokens are rows cu_seqlens[i]:cu_seqlens[i+1];
    they extend its context to context_lens[i] tokens."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    cu_seqlens: torch.Tensor  # [N+1] int32
    state_slots: torch.Tensor  # [N] int32, the lightning state slot of each sequence; -1 = padding
    block_tables: torch.Tensor  # [N, max_blocks] int32, KV blocks of each sequence
    slot_mapping: torch.Tensor  # [T] int64, flat KV position (block * block_size + offset) of each token
    context_lens_t: torch.Tensor  # [N] int32, cached tokens per sequence after this step
    seq_lens: list[int]  # new tokens per sequence (host copy)
    context_lens: list[int]  # context_lens_t on the host
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool  # every sequence brings exactly one token
    logits_indices: torch.Tensor  # [R] int64, rows whose next-token logits are wanted


@dataclasses.dataclass
class Caches:
    """Per-layer state the model reads and writes: lightning states (by linear-layer order) and KV
    (by softmax-layer order)."""

    lightning: torch.Tensor  # [num_linear_layers, slots, H, D, D] fp32
    kv: torch.Tensor  # [num_softmax_layers, 2, num_blocks, block_size, kv_heads, D]
