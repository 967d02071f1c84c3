"""RMSNorm layers; the arithmetic (fused kernels and their torch reference) is ops/norm."""
import torch
from torch import nn

from ..distributed import SINGLE, Group
from ..ops import norm
from .linear import Plan, box, replicated, set_load_plan


class RMSNorm(nn.Module):
    """The whole feature vector on every rank (the decoder's norms)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = replicated(nn.Parameter(torch.ones(size)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm.rms_norm(x, self.weight, self.eps)

    def add_norm(self, r: torch.Tensor, a: torch.Tensor, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepNorm's residual h = alpha * r + beta * a and this norm of it, one pass: returns (h, norm(h))."""
        return norm.add_rms_norm(r, a, self.weight, self.eps, alpha, beta)


class ParallelRMSNorm(nn.Module):
    """RMSNorm over `size` features split evenly across the group's ranks (the lightning output norm over all
    H * D features, each rank holding its heads'): x [T, size/N] -> [T, size/N]. The fp32 sum of squares
    [T] is all-reduced, one tiny collective; at world size 1 this is an RMSNorm itself. Given `gate` [T, size/N]
    (the lightning layer's output gate logits), forward returns sigmoid(gate) * norm(x) in one pass."""

    def __init__(self, size: int, eps: float, group: Group = SINGLE):
        super().__init__()
        per = size // group.world_size
        assert per * group.world_size == size, (size, group.world_size)
        self.size, self.eps, self.group = size, eps, group
        self.cols = (group.rank * per, (group.rank + 1) * per)
        self.weight = set_load_plan(nn.Parameter(torch.ones(per)), self._plan)

    def _plan(self, shard_id) -> Plan:
        assert shard_id is None, shard_id
        return (self.size,), [(box(self.cols), box((0, self.cols[1] - self.cols[0])))]

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None:
            if self.group.world_size == 1:
                return norm.gated_rms_norm(x, gate, self.weight, self.eps)
            sum_sq = self.group.all_reduce(norm.sum_squares(x))  # emulation: this rank's share only
            return norm.gated_rms_norm(x, gate, self.weight, self.eps, sum_sq, self.size)
        if self.group.world_size == 1:
            return norm.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        sum_sq = self.group.all_reduce(xf.pow(2).sum(-1, keepdim=True))  # emulation: this rank's share only
        xf = xf * torch.rsqrt(sum_sq / self.size + self.eps)
        return (self.weight.float() * xf).to(x.dtype)
