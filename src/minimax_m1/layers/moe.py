"""Sparse MoE: fp32 softmax router, top-k renormalised, experts as stacked tensors.

Small batches (tokens * top_k <= FUSED_MAX_ROWS, CUDA, bf16/fp16) run the fused kernels of
ops/moe_cuda.py, which stream each used expert's weights once; larger batches, and every other case, run
grouped GEMM over tokens sorted by expert."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops import moe_cuda
from ..ops.grouped_gemm import grouped_mm

# Largest tokens * top_k for the fused kernels. benchmarks/bench_moe.py on an H200 (MiniMax-M1's layer, random
# router): fused / grouped-GEMM speedup 1.79x at 1 token, 1.47x at 64, 1.44x at 128, 1.18x at 256, 1.03x at 384,
# 0.75x at 512; with a skewed router (hot experts take several CTAs, each re-reading the weights) 1.11x at 128.
# 256 rows (128 tokens at top-2) keeps a margin for skewed routings.
FUSED_MAX_ROWS = 256


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

    def use_fused(self, x: torch.Tensor) -> bool:
        """Whether forward runs the fused small-batch kernels for this input."""
        return (x.shape[0] * self.top_k <= FUSED_MAX_ROWS
                and moe_cuda.supports(x, self.w13, self.w2, self.top_k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if self.use_fused(x):
            return moe_cuda.moe_experts(x, experts, weights, self.w13, self.w2)
        return self.grouped_experts(x, weights, experts)

    def grouped_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The routed experts by grouped GEMM: x [T, hidden], weights [T, k] fp32, experts [T, k] -> [T, hidden]."""
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
