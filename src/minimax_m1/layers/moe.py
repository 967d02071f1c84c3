"""Sparse MoE: fp32 softmax router, top-k renormalised, experts as stacked tensors (the experts themselves run
in ops/moe: fused kernels for small batches, grouped GEMM otherwise)."""
import torch
from torch import nn

from ..config import ModelConfig
from ..ops.moe import moe_experts


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
        return moe_experts(x, experts, weights, self.w13, self.w2)
