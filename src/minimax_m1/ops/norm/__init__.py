"""The decoder's RMSNorms, fused with what surrounds them at decode:

    rms_norm(x, weight, eps) -> y                                   w * x * rsqrt(mean(x^2) + eps)
    add_rms_norm(r, a, weight, eps, alpha, beta) -> (h, y)          h = alpha * r + beta * a, y = rms_norm(h)
    gated_rms_norm(x, gate, weight, eps, sum_sq=None, size=None)    sigmoid(gate) * rms_norm(x)
    sum_squares(x) -> [...] fp32                                    sum(x^2), a rank's share under TP

x, r, a, gate [..., n] in one dtype; weight [n]; fp32 inside. add_rms_norm is DeepNorm's residual with the next
layer's norm in one pass (both outputs in x's dtype); gated_rms_norm is the lightning layer's output norm and
gate; under tensor parallelism its mean square spans all ranks' features: each rank passes sum_sq, the
all-reduce of its sum_squares, and size, the features of all ranks (layers/norm.py does this).

Each entry runs the CUDA kernels (cuda.py) where `cuda.supports` the tensors (CUDA, bf16/fp16, the weight in
x's dtype, n a multiple of 8 up to 16384) and the torch reference (reference.py) otherwise: CPU, fp32, odd sizes.
The kernels round exactly where the reference rounds, with the same fp32 operations; they differ from it only
where a sum of squares accumulated in another order moves an output across a rounding step (one ulp).
The kernels read nothing on the host, so decode steps stay capturable in CUDA graphs.
"""
from __future__ import annotations

import torch

from . import cuda, reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if cuda.supports(x, weight):
        return cuda.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(r: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float, alpha: float,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    if cuda.supports(r, weight, a):
        return cuda.add_rms_norm(r, a, weight, eps, alpha, beta)
    return reference.add_rms_norm(r, a, weight, eps, alpha, beta)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   sum_sq: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
    if sum_sq is not None and size is None:
        raise ValueError("gated_rms_norm: sum_sq needs size, the number of features it sums over")
    if cuda.supports(x, weight, gate) and (sum_sq is None or sum_sq.device == x.device):
        return cuda.gated_rms_norm(x, gate, weight, eps, sum_sq, size)
    return reference.gated_rms_norm(x, gate, weight, eps, sum_sq, size)


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    if cuda.supports_rows(x):
        return cuda.sum_squares(x)
    return reference.sum_squares(x)


__all__ = ["rms_norm", "add_rms_norm", "gated_rms_norm", "sum_squares", "reference", "cuda"]
