"""Grouped GEMM for MoE experts: rows of x sorted by expert, one weight matrix per expert."""
import torch


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        # CUDA's grouped GEMM is bf16 on sm_90+ (Hopper) only
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()  # every row stride a multiple of 16 bytes
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and w.shape[-2] % align == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, K] (rows grouped by expert), w [E, N, K], offsets [E] int32 (cumulative row ends) -> [M, N].
    Row r of group e is x[r] @ w[e]^T."""
    if _grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[1])
    ends = offsets.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out
