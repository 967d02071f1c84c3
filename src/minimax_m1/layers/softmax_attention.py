"""Softmax attention with GQA and partial rotary over a paged KV cache."""
import torch
from torch import nn

from ..config import ModelConfig
from ..forward_batch import ForwardBatch
from ..ops.paged_attention import paged_attention, write_kv
from .rotary import PartialRotary


class SoftmaxAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary = PartialRotary(config.head_dim, config.rotary_dim, config.rope_theta)
        self.scale = self.head_dim ** -0.5

    def init_buffers(self) -> None:
        self.rotary.init_buffers()

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor,
                cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        q = self.rotary(self.q_proj(x).view(t, self.num_heads, self.head_dim), *cos_sin)
        k = self.rotary(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), *cos_sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        write_kv(kv_cache, k, v, batch.slot_mapping)
        o = paged_attention(q, kv_cache, batch.block_tables, batch.cu_seqlens, batch.context_lens_t, self.scale,
                            max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k,
                            is_decode=batch.is_decode, seq_lens=batch.seq_lens, host_context_lens=batch.context_lens)
        return self.o_proj(o.reshape(t, -1))
