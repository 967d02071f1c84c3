"""The lightning (linear) attention layer: per-head qkv, decayed linear attention, one RMSNorm over all
heads, sigmoid output gate."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, lightning_slopes
from ..forward_batch import ForwardBatch
from ..ops import lightning_attn
from .norm import RMSNorm


class LightningAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        width = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * width, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, width, bias=False)
        self.out_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.norm = RMSNorm(width, config.lightning_norm_eps)
        self._slopes = lightning_slopes(self.num_heads, *config.global_layer(layer_idx))
        self.register_buffer("slopes", torch.empty(self.num_heads, dtype=torch.float32), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the fp32 decay rates, e.g. after the model moved off the meta device."""
        if self.slopes.device.type != "meta":
            self.slopes = torch.tensor(self._slopes, dtype=torch.float32, device=self.slopes.device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, states: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        # qkv is laid out per head: [T, H, (q | k | v)], not [Q_all | K_all | V_all]
        qkv = F.silu(self.qkv_proj(x)).view(t, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if batch.is_decode:
            o = lightning_attn.decode(q, k, v, self.slopes, states, batch.state_slots)
        else:
            o = lightning_attn.prefill(q, k, v, self.slopes, states, batch.state_slots, batch.cu_seqlens)
        o = self.norm(o.reshape(t, -1))
        o = torch.sigmoid(self.output_gate(x)) * o
        return self.out_proj(o)
