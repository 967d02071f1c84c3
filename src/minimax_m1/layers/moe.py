"""Sparse MoE: fp32 softmax router, top-k renormalised, experts as stacked tensors (the experts themselves run
in ops/moe: fused kernels for small batches, grouped GEMM otherwise).

Over N ranks (distributed.Group) the router stays whole on every rank and the experts split one of two ways,
each followed by ONE all-reduce of the output:
- tensor parallel (default): all E experts on every rank, each sharded on its intermediate dim: rank r holds
  rows [r*I/N, (r+1)*I/N) of w1 and of w3 (packed into its w13) and those columns of w2;
- expert parallel: rank r holds E/N whole experts [r*E/N, (r+1)*E/N); `expert_map` sends the router's global
  ids to local ones, -1 for other ranks' experts, which contribute nothing here.

The experts' parameters (w13, w2, and with 8-bit experts their scales w13_scale, w2_scale) are created, loaded
and run by the layer's quantisation method (quantization/base.py), from the load plans below.
"""
import torch
from torch import nn

from ..config import ModelConfig, QuantConfig
from ..distributed import SINGLE, Group
from ..ops import router
from ..quantization.base import experts_method
from .linear import Plan, ReplicatedLinear, box


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, group: Group = SINGLE, expert_parallel: bool = False,
                 quant: QuantConfig | None = None):
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
        self.quant_method = experts_method(quant)
        self.quant_method.create_weights(self)
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
        """x [T, hidden] -> (weights [T, k] fp32, expert ids [T, k] int64): top-k of softmax(gate(x)) in fp32,
        renormalised (ops/router: fused kernels for decode batches, the torch reference otherwise)."""
        return router.route(x, self.gate.weight, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if self.expert_map is not None:
            experts = self.expert_map[experts]
        return self.group.all_reduce(self.compute_experts(x, weights, experts))

    def compute_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """This rank's experts: x [T, hidden], weights [T, k] fp32, experts [T, k] local ids (outside
        [0, num_experts): another rank's expert, no contribution) -> its partial output [T, hidden]."""
        return self.quant_method.apply(self, x, weights, experts)
