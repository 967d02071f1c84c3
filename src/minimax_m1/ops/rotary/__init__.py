"""Partial rotary embedding of a softmax layer's q and k, fused with the store of k and v into the paged KV cache:

    rotary_write_kv(q, k, v, cos, sin, kv_cache, slot_mapping) -> q rotated
    apply_rotary(x, cos, sin) -> x rotated                        (the reference math; layers/rotary.py)

q [T, Hq, D], k and v [T, Hkv, D]; cos, sin [T, rotary_dim] fp32 (PartialRotary.cos_sin); kv_cache
[2, blocks, block_size, Hkv, D]; slot_mapping [T] (block * block_size + offset). Dims [0, rotary_dim) of each head
rotate NeoX style within themselves, the rest pass through; k rotated and v go to the cache, q rotated is
returned. On CUDA in bf16/fp16 (head_dim a multiple of 8, rotary_dim of 16) one kernel does all of it, computing
the reference's fp32 products and sums in its order (bit for bit); elsewhere the torch reference runs.
"""
from __future__ import annotations

import torch

from . import cuda, reference
from .reference import apply_rotary


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    if cuda.supports(q, k, v, cos, kv_cache):
        return cuda.rotary_write_kv(q, k, v, cos, sin, kv_cache, slot_mapping)
    return reference.rotary_write_kv(q, k, v, cos, sin, kv_cache, slot_mapping)


__all__ = ["rotary_write_kv", "apply_rotary", "reference", "cuda"]
