"""Sparse MoE: fp32 softmax router, top-k renormalised, experts as stacked tensors.

Small batches (tokens * top_k <= FUSED_MAX_ROWS, CUDA, bf16/fp16) run the fused kernels of
ops/moe_cuda.py, which stream each used expert's weights once; larger batches, and every other case, run
grouped GEMM over tokens sorted by expert.

Over N ranks (distributed.Group) the router stays whole on every rank and the experts split one of two ways,
each followed by ONE all-reduce of the output:
- tensor parallel (default): all E experts on every rank, each sharded on its intermediate dim: rank r holds
  rows [r*I/N, (r+1)*I/N) of w1 and of w3 (packed into its w13) and those columns of w2;
- expert parallel: rank r holds E/N whole experts [r*E/N, (r+1)*E/N); `expert_map` sends the router's global
  ids to local ones, -1 for other ranks' experts, which contribute nothing here.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..distributed import SINGLE, Group
from ..ops import moe_cuda
from ..ops.grouped_gemm import grouped_mm
from .linear import Plan, ReplicatedLinear, box, set_load_plan

# Largest tokens * top_k for the fused kernels. benchmarks/bench_moe.py on an H200 (MiniMax-M1's layer, random
# router): fused / grouped-GEMM speedup 1.79x at 1 token, 1.47x at 64, 1.44x at 128, 1.18x at 256, 1.03x at 384,
# 0.75x at 512; with a skewed router (hot experts take several CTAs, each re-reading the weights) 1.11x at 128.
# 256 rows (128 tokens at top-2) keeps a margin for skewed routings.
FUSED_MAX_ROWS = 256


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, group: Group = SINGLE, expert_parallel: bool = False):
        super().__init__()
        e, h, i, n, r = (config.num_local_experts, config.hidden_size, config.intermediate_size, group.world_size,
                         group.rank)
        self.group, self.top_k, self.hidden = group, config.num_experts_per_tok, h
        self.global_experts, self.global_intermediate = e, i
        if expert_parallel:
            assert e % n == 0, (e, n)
            self.num_experts, self.intermediate = e // n, i  # on this rank
            self.first_expert, self.first_row = r * (e // n), 0
        else:
            assert i % n == 0, (i, n)
            self.num_experts, self.intermediate = e, i // n
            self.first_expert, self.first_row = 0, r * (i // n)
        self.gate = ReplicatedLinear(h, e)
        # per local expert: [w1 (gate); w3 (up)] rows of this rank, and its w2 (down) columns
        self.w13 = set_load_plan(nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate, h)), self._w13_plan)
        self.w2 = set_load_plan(nn.Parameter(torch.empty(self.num_experts, h, self.intermediate)), self._w2_plan)
        sharded_experts = self.num_experts < e
        self.register_buffer("expert_map", torch.empty(e, dtype=torch.int64) if sharded_experts else None,
                             persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute expert_map (global expert id -> local id, -1 on other ranks), e.g. off the meta device."""
        if self.expert_map is not None and self.expert_map.device.type != "meta":
            m = torch.full((self.global_experts,), -1, dtype=torch.int64, device=self.expert_map.device)
            m[self.first_expert:self.first_expert + self.num_experts] = torch.arange(self.num_experts, device=m.device)
            self.expert_map = m

    # ---- loading: shard ids ("w1" | "w3" | "w2", expert) for the released per-expert tensors, None for the
    # packed [E, 2I, H] gate_up / [E, H, I] down tensors transformers writes

    def _local(self, expert: int) -> int | None:
        local = expert - self.first_expert
        return local if 0 <= local < self.num_experts else None

    def _w13_plan(self, shard_id) -> Plan:
        e, i, il, h, r0 = self.global_experts, self.global_intermediate, self.intermediate, self.hidden, self.first_row
        if shard_id is None:
            experts = (self.first_expert, self.first_expert + self.num_experts)
            return (e, 2 * i, h), [(box(experts, (r0, r0 + il), (0, h)), box((0, self.num_experts), (0, il), (0, h))),
                                   (box(experts, (i + r0, i + r0 + il), (0, h)),
                                    box((0, self.num_experts), (il, 2 * il), (0, h)))]
        part, expert = shard_id
        assert part in ("w1", "w3"), shard_id
        local = self._local(expert)
        if local is None:
            return (i, h), []
        dst_rows = (0, il) if part == "w1" else (il, 2 * il)
        return (i, h), [(box((r0, r0 + il), (0, h)), box((local, local + 1), dst_rows, (0, h)))]

    def _w2_plan(self, shard_id) -> Plan:
        e, i, il, h, r0 = self.global_experts, self.global_intermediate, self.intermediate, self.hidden, self.first_row
        if shard_id is None:
            experts = (self.first_expert, self.first_expert + self.num_experts)
            return (e, h, i), [(box(experts, (0, h), (r0, r0 + il)), box((0, self.num_experts), (0, h), (0, il)))]
        part, expert = shard_id
        assert part == "w2", shard_id
        local = self._local(expert)
        if local is None:
            return (h, i), []
        return (h, i), [(box((0, h), (r0, r0 + il)), box((local, local + 1), (0, h), (0, il)))]

    # ---- compute

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
        if self.expert_map is not None:
            experts = self.expert_map[experts]
        return self.group.all_reduce(self.compute_experts(x, weights, experts))

    def compute_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's experts: x [T, hidden], weights [T, k] fp32, experts [T, k] local ids (outside
        [0, num_experts): another rank's expert, no contribution) -> its partial output [T, hidden]."""
        if self.use_fused(x):
            return moe_cuda.moe_experts(x, experts, weights, self.w13, self.w2)
        return self.grouped_experts(x, weights, experts)

    def grouped_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The routed experts by grouped GEMM: x [T, hidden], weights [T, k] fp32, experts [T, k] -> [T, hidden]."""
        flat = experts.flatten()
        foreign = self.expert_map is not None  # ids may name other ranks' experts: they sort last, bin E
        if foreign:
            flat = torch.where((flat < 0) | (flat >= self.num_experts), self.num_experts, flat)
        order = flat.argsort(stable=True)
        token_of_row = order // self.top_k
        # a scatter rather than bincount: bincount reads its max back to the host, which CUDA graphs forbid
        counts = torch.zeros(self.num_experts + foreign, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = counts[: self.num_experts].cumsum(0, dtype=torch.int32)
        h = grouped_mm(x[token_of_row], self.w13, offsets)
        h = F.silu(h[:, : self.intermediate]) * h[:, self.intermediate:]
        y = grouped_mm(h, self.w2, offsets)
        y = y.float() * weights.flatten()[order, None]
        if foreign:  # rows past the last offset are not computed (undefined): drop them
            y = torch.where((flat[order] < self.num_experts)[:, None], y, 0.0)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of_row, y).to(x.dtype)
