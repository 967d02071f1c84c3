"""Softmax attention with GQA and partial rotary over a paged KV cache. Under tensor parallelism each rank
has H/N query heads and the KV heads they read: Hkv/N of them, or when N > Hkv the one KV head its query
heads share (replicated on N/Hkv ranks); o_proj is row-parallel."""
import torch
from torch import nn

from ..config import ModelConfig
from ..distributed import SINGLE, Group
from ..forward_batch import ForwardBatch
from ..ops.paged_attention import paged_attention
from ..ops.rotary import rotary_write_kv
from .linear import QKVParallelLinear, RowParallelLinear, column_parallel_parts
from .rotary import PartialRotary


class SoftmaxAttention(nn.Module):
    def __init__(self, config: ModelConfig, group: Group = SINGLE):
        super().__init__()
        self.head_dim, h = config.head_dim, config.hidden_size
        self.q_proj = QKVParallelLinear(h, config.num_attention_heads, self.head_dim, group)
        self.k_proj = QKVParallelLinear(h, config.num_key_value_heads, self.head_dim, group)
        self.v_proj = QKVParallelLinear(h, config.num_key_value_heads, self.head_dim, group)
        self.num_heads, self.num_kv_heads = self.q_proj.num_heads, self.k_proj.num_heads  # on this rank
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, h, group)
        self.rotary = PartialRotary(config.head_dim, config.rotary_dim, config.rope_theta)
        self.scale = self.head_dim ** -0.5

    def init_buffers(self) -> None:
        self.rotary.init_buffers()

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = column_parallel_parts(x, self.q_proj, self.k_proj, self.v_proj)  # one launch at decode sizes
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # rotary on q and k, k and v into the cache: one kernel on CUDA (ops/rotary)
        q = rotary_write_kv(q, k, v, *cos_sin, kv_cache, batch.slot_mapping)
        o = paged_attention(q, kv_cache, batch.block_tables, batch.cu_seqlens, batch.context_lens_t, self.scale,
                            max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.context_len_bound,
                            is_decode=batch.is_decode, seq_lens=batch.seq_lens, host_context_lens=batch.context_lens)
        return self.o_proj(o.reshape(t, -1))
