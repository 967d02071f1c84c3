"""Sparse MoE: fp32 softmax router, top-k renormalised, experts as stacked tensors run by grouped GEMM
over tokens sorted by expert."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.grouped_gemm import grouped_mm


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.top_k, self.num_experts, self.intermediate = config.num_experts_per_tok, e, i
        self.gate = nn.Linear(h, e, bias=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))  # per expert: [w1 (gate); w3 (up)]
        self.w2 = nn.Parameter(torch.empty(e, h, i))  # per expert: down

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] fp32, expert ids [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        token_of_row = order // self.top_k
        # a scatter rather than bincount: bincount reads its max back to the host, which CUDA graphs forbid
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)
        h = grouped_mm(x[token_of_row], self.w13, offsets)
        h = F.silu(h[:, : self.intermediate]) * h[:, self.intermediate:]
        y = grouped_mm(h, self.w2, offsets)
        y = y.float() * weights.flatten()[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of_row, y).to(x.dtype)
