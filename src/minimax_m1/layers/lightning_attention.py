"""The lightning (linear) attention layer: per-head qkv, decayed linear attention, one RMSNorm over all
heads, sigmoid output gate. Under tensor parallelism each rank owns heads [r*H/N, (r+1)*H/N): their qkv rows
and output-gate rows (column-parallel), their decay rates, their state slots, their norm features (the sum
of squares all-reduced) and their columns of out_proj (row-parallel, all-reduced)."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, lightning_slopes
from ..distributed import SINGLE, Group
from ..forward_batch import ForwardBatch
from ..ops import lightning_attn
from .linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, column_parallel_parts
from .norm import ParallelRMSNorm


class LightningAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, group: Group = SINGLE):
        super().__init__()
        heads, self.head_dim = config.num_attention_heads, config.head_dim
        width = heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, heads, 3 * self.head_dim, group)
        self.num_heads = self.qkv_proj.num_heads  # on this rank: its state pool holds these heads only
        self.output_gate = ColumnParallelLinear(config.hidden_size, width, group)
        self.out_proj = RowParallelLinear(width, config.hidden_size, group)
        self.norm = ParallelRMSNorm(width, config.lightning_norm_eps, group)
        # this rank's heads' rates, sliced from the global set (the formula depends on the head count)
        first = self.qkv_proj.first_head
        self._slopes = lightning_slopes(heads, *config.global_layer(layer_idx))[first:first + self.num_heads]
        self.register_buffer("slopes", torch.empty(self.num_heads, dtype=torch.float32), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the fp32 decay rates, e.g. after the model moved off the meta device."""
        if self.slopes.device.type != "meta":
            self.slopes = torch.tensor(self._slopes, dtype=torch.float32, device=self.slopes.device)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, states: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        # qkv is laid out per head: [T, H, (q | k | v)], not [Q_all | K_all | V_all]
        qkv, gate = column_parallel_parts(x, self.qkv_proj, self.output_gate)  # one launch at decode sizes
        qkv = qkv.view(t, self.num_heads, 3 * self.head_dim)
        if batch.is_decode:  # the decode kernel applies the SiLU as it reads q, k, v
            q, k, v = qkv.split(self.head_dim, dim=-1)
            o = lightning_attn.decode(q, k, v, self.slopes, states, batch.state_slots, silu=True)
        else:
            q, k, v = F.silu(qkv).split(self.head_dim, dim=-1)
            o = lightning_attn.prefill(q, k, v, self.slopes, states, batch.state_slots, batch.cu_seqlens)
        o = self.norm(o.reshape(t, -1), gate)  # sigmoid(gate) * RMSNorm(o), one pass
        return self.out_proj(o)
