"""The RMSNorms of the decoder in plain torch: what CPU and every case the kernels do not take run, and what the
kernels are tested against. Each function computes exactly what the layers computed before the kernels existed:
fp32 inside, rounded to x's dtype where torch's own arithmetic rounds."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps), all in fp32, cast back to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def add_rms_norm(r: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float, alpha: float,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepNorm's residual and the next norm: h = alpha * r + beta * a (in x's dtype), returns (h, rms_norm(h))."""
    h = r * alpha + a * beta
    return h, rms_norm(h, weight, eps)


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> [...] fp32 sums of x^2 (one rank's share of a norm over features split across ranks)."""
    return x.float().pow(2).sum(-1)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   sum_sq: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
    """sigmoid(gate) * RMSNorm(x): the mean square over x's features, or, given sum_sq [...] fp32 (all ranks'
    sums of squares, all-reduced), sum_sq / size."""
    if sum_sq is None:
        o = rms_norm(x, weight, eps)
    else:
        xf = x.float()
        xf = xf * torch.rsqrt(sum_sq[..., None] / size + eps)
        o = (weight.float() * xf).to(x.dtype)
    return torch.sigmoid(gate) * o
