"""Partial rotary embedding and the KV-cache store in plain torch: what CPU and every case the kernel does not take
run, and the kernel's oracle."""
import torch

from ..paged_attention import write_kv


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, rotary_dim] fp32 -> x's shape and dtype: dims [0, rotary_dim) of each
    head rotate NeoX style within themselves (pairs (i, i + rotary_dim/2)) in fp32, the rest pass through."""
    rd = cos.shape[-1]
    rot = x[..., :rd].float()
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, None, :] + rotated * sin[:, None, :]
    if rd == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat((out.to(x.dtype), x[..., rd:]), dim=-1)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q and k, store k and v at slot_mapping in kv_cache (ops/paged_attention.write_kv); returns q rotated."""
    write_kv(kv_cache, apply_rotary(k, cos, sin), v, slot_mapping)
    return apply_rotary(q, cos, sin)
