"""The model's operators, one package each: lightning_attn/, paged_attention/, moe/, and the decode step's fused
small kernels norm/ (RMSNorms with the residual or the gate), router/, rotary/ (with the KV store), gemv/.

Each package holds a plain torch reference, the binding of its CUDA kernels (cuda.py; the libraries and the
environment switches are loaded and read once in _library.py), one dispatch entry that takes tensors, and the
answer to what it supports: `why_not_capturable(...)` tells the engine whether decode steps can be captured in
CUDA graphs. Workspaces that must exist before a capture are reserved by one call, `reserve_workspaces`.
"""
from __future__ import annotations

import torch

from . import paged_attention


def reserve_workspaces(kv_cache: torch.Tensor, num_q_heads: int, max_batch: int, max_context: int) -> None:
    """Allocate every workspace decode steps of up to max_batch sequences need, before CUDA graph capture.
    Only the paged decode kernel keeps one (kv_cache: one softmax layer's cache; max_context: max_model_len);
    the other kernels take theirs from torch's caching allocator, which a capture serves from the graph's pool."""
    paged_attention.reserve_workspace(kv_cache, num_q_heads, max_batch, max_context)
