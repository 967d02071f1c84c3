"""The routed experts in fp32: the oracle the fused kernels and the grouped-GEMM path are tested against."""
import torch
import torch.nn.functional as F


def reference_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
    """Same contract as `moe_experts`, all in fp32 on x's (rounded) values: per used expert, its routed tokens
    through w1/w3, silu(g) * u, w2, weighted and summed. Ids outside [0, E) contribute nothing. Returns [T, H]
    fp32 (run with TF32 off for an fp32 oracle on the GPU)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in experts.unique().tolist():
        if not 0 <= e < w13.shape[0]:
            continue
        tok, j = (experts == e).nonzero(as_tuple=True)
        h = x[tok].float() @ w13[e].float().t()
        a = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, (a @ w2[e].float().t()) * weights[tok, j, None])
    return out
