"""fp8: W8A8 experts in e4m3 (3 mantissa bits, largest finite value 448).

Weights: per-output-channel scale_c = max|w_c| / 448, q = e4m3(w / scale_c) (round to nearest even,
saturating): a relative error of at most 2^-4 per weight in e4m3's normal range (|w / scale_c| >= 2^-6), at most
2^-10 scale_c below it. Activations: per token (per row of the GEMM input) a_t = max|x_t| / 448, quantised the
same way, every time the experts run. The products accumulate in fp32: y_tc = a_t scale_c sum_k xq_tk q_ck.

Public fp8 checkpoints (DeepSeek-V3's layout) store 128x128-block scales instead: next to an e4m3 weight
[N, K], `weight_scale_inv` [ceil(N/128), ceil(K/128)] with w = q * scale_inv[n // 128, k // 128]. They load
through `dequantize_blocks` and are quantised again per output channel (the fused kernel takes per-channel
scales only). That second rounding costs at most 2^-4 relative per weight again (normal range; 2^-10 of the
new scale below it), about as much as the first: an element whose block scale was smaller than its row's
largest block scale loses low bits. Carrying block scales through would need a block-scaled GEMM on every
path; requantising keeps one format everywhere.
"""
from __future__ import annotations

import torch

from .base import PerChannelExperts

BLOCK = 128


class Fp8Experts(PerChannelExperts):
    name = "fp8"


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, rows: slice, cols: slice,
                      block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """A box of a block-scaled weight in fp32: q [..., n, k] is the box rows x cols of the whole weight (leading
    dims already selected), scale_inv [..., ceil(N/bn), ceil(K/bk)] the matching leading dims of the whole
    weight's block scales."""
    bn, bk = block
    s = scale_inv[..., rows.start // bn:-(-rows.stop // bn), cols.start // bk:-(-cols.stop // bk)].float()
    s = s.repeat_interleave(bn, -2).repeat_interleave(bk, -1)
    r0, c0 = rows.start % bn, cols.start % bk
    s = s[..., r0:r0 + q.shape[-2], c0:c0 + q.shape[-1]]
    return q.float() * s
