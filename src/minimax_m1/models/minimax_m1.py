"""MiniMax-M1: DeepNorm decoder layers alternating lightning and softmax attention, each with a sparse MoE."""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LINEAR, ModelConfig
from ..forward_batch import Caches, ForwardBatch
from ..layers.lightning_attention import LightningAttention
from ..layers.moe import SparseMoE
from ..layers.norm import RMSNorm
from ..layers.softmax_attention import SoftmaxAttention


class DecoderLayer(nn.Module):
    """h = alpha * r + beta * Attn(norm(h)), then the same with the MoE; r is the normed input when
    `postnorm` (DeepNorm as MiniMax ships it), the un-normed input otherwise."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_linear = config.attn_type_list[layer_idx] == LINEAR
        self.postnorm = config.postnorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_linear:
            self.self_attn = LightningAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha, config.linear_attn_beta
        else:
            self.self_attn = SoftmaxAttention(config)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha, config.full_attn_beta
        self.block_sparse_moe = SparseMoE(config)
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta

    def forward(self, h, batch: ForwardBatch, cache: torch.Tensor, cos_sin) -> torch.Tensor:
        xn = self.input_layernorm(h)
        if self.is_linear:
            a = self.self_attn(xn, batch, cache)
        else:
            a = self.self_attn(xn, batch, cache, cos_sin)
        h = (xn if self.postnorm else h) * self.attn_alpha + a * self.attn_beta
        yn = self.post_attention_layernorm(h)
        return (yn if self.postnorm else h) * self.mlp_alpha + self.block_sparse_moe(yn) * self.mlp_beta


class MiniMaxModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniMaxM1ForCausalLM(nn.Module):
    """forward(input_ids [T], batch, caches) -> hidden [T, hidden]; compute_logits(hidden [R, hidden]) -> fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MiniMaxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # which slice of the caches each layer owns
        self.cache_index = []
        counts = [0, 0]
        for layer in self.model.layers:
            kind = 0 if layer.is_linear else 1
            self.cache_index.append((kind, counts[kind]))
            counts[kind] += 1
        self._rotary = next((l.self_attn.rotary for l in self.model.layers if not l.is_linear), None)

    def init_buffers(self) -> None:
        """Recompute derived fp32 buffers (decay rates, rotary frequencies) once parameters are in place."""
        for layer in self.model.layers:
            layer.self_attn.init_buffers()

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, caches: Caches) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        cos_sin = self._rotary.cos_sin(batch.positions) if self._rotary is not None else None
        for layer, (kind, idx) in zip(self.model.layers, self.cache_index):
            cache = caches.lightning[idx] if kind == 0 else caches.kv[idx]
            h = layer(h, batch, cache, cos_sin)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        return F.linear(hidden.to(w.dtype), w).float()
