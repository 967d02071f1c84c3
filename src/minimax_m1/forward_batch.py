"""What one model step needs to know about the packed batch it runs on."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ForwardBatch:
    """N sequences packed into T tokens. Sequence i's new tokens are rows cu_seqlens[i]:cu_seqlens[i+1];
    they extend its context to context_lens_t[i] tokens. The tensors are on the model's device. The host
    lists exist only for the paths that loop over sequences on the host (the torch reference attention,
    the context gather); they are None in a captured CUDA graph, whose replays change the lengths."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    cu_seqlens: torch.Tensor  # [N+1] int32
    state_slots: torch.Tensor  # [N] int32, the lightning state slot of each sequence; -1 = padding
    block_tables: torch.Tensor  # [N, W] int32, KV blocks of each sequence; entries past its own are never read
    slot_mapping: torch.Tensor  # [T] int64, flat KV position (block * block_size + offset) of each token
    context_lens_t: torch.Tensor  # [N] int32, cached tokens per sequence after this step
    logits_indices: torch.Tensor  # [R] int64, rows whose next-token logits are wanted
    max_seqlen_q: int  # the most new tokens any sequence brings
    context_len_bound: int  # no context_lens_t[i] exceeds it (eager: their maximum; a graph: max_model_len)
    is_decode: bool  # every sequence brings exactly one token
    seq_lens: list[int] | None  # host: new tokens per sequence
    context_lens: list[int] | None  # host: context_lens_t


@dataclasses.dataclass
class Caches:
    """Per-layer state the model reads and writes: lightning states (by linear-layer order) and KV
    (by softmax-layer order)."""

    lightning: torch.Tensor  # [num_linear_layers, slots, H, D, D] fp32
    kv: torch.Tensor  # [num_softmax_layers, 2, num_blocks + 1, block_size, kv_heads, D] (the last block: scratch)
