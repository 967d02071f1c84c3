"""Partial rotary embedding: only the first `rotary_dim` dims of each head rotate, rotate-half (NeoX)
style within them (pairs (i, i + rotary_dim/2)); the remaining dims pass through unchanged."""
import torch
from torch import nn

from ..ops.rotary import apply_rotary


class PartialRotary(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.theta = theta
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2, dtype=torch.float32), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute inv_freq = theta^(-2i/rotary_dim) in fp32, e.g. after the model moved off the meta device."""
        dev = self.inv_freq.device
        if dev.type == "meta":
            return
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=dev) / self.rotary_dim
        self.inv_freq = 1.0 / (self.theta ** exps)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rotary_dim] in fp32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] -> same shape and dtype, rotated in fp32 (ops/rotary.apply_rotary)."""
        return apply_rotary(x, cos, sin)
