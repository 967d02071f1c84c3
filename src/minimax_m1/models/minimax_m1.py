"""MiniMax-M1: DeepNorm decoder layers alternating lightning and softmax attention, each with a sparse MoE;
and the mapping from checkpoint tensor names to parameters (both spellings).

Built on a distributed.Group, each rank's model holds only its share (see layers/): the lightning and
softmax heads, the KV heads, the vocabulary rows and the experts' rows (or whole experts) of that rank."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..config import LINEAR, SOFTMAX, ModelConfig, ParallelConfig, QuantConfig
from ..distributed import SINGLE, Group, tensor_parallel_group
from ..forward_batch import Caches, ForwardBatch
from ..layers.lightning_attention import LightningAttention
from ..layers.moe import SparseMoE
from ..layers.norm import RMSNorm
from ..layers.softmax_attention import SoftmaxAttention
from ..layers.vocab import ParallelLMHead, VocabParallelEmbedding

# Buffers transformers derives from the config and saves anyway; the engine recomputes them.
DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$"
                     r"|model\.rotary_emb\.inv_freq$|.*\.rotary\.inv_freq$")
# transformers >= 5 packs each layer's experts: mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj
# [E, H, I], and names the router mlp.gate.weight
_PACKED = re.compile(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")
_PACKED_PARAM = {"experts.gate_up_proj": "w13", "experts.down_proj": "w2", "gate.weight": "gate.weight"}


class DecoderLayer(nn.Module):
    """h = alpha * r + beta * Attn(norm(h)), then the same with the MoE; r is the normed input when
    `postnorm` (DeepNorm as MiniMax ships it), the un-normed input otherwise."""

    def __init__(self, config: ModelConfig, layer_idx: int, group: Group = SINGLE, expert_parallel: bool = False,
                 quant: QuantConfig | None = None):
        super().__init__()
        self.is_linear = config.attn_type_list[layer_idx] == LINEAR
        self.postnorm = config.postnorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_linear:
            self.self_attn = LightningAttention(config, layer_idx, group)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha, config.linear_attn_beta
        else:
            self.self_attn = SoftmaxAttention(config, group)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha, config.full_attn_beta
        self.block_sparse_moe = SparseMoE(config, group, expert_parallel, quant)
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta

    def forward(self, h: torch.Tensor, xn: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor, cos_sin,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the residual stream entering the layer, xn = input_layernorm(h) (the previous layer computed it in
        the pass that made h). Returns (h out, next_norm(h out)): each residual add runs in one pass with the norm
        that follows it (ops/norm.add_rms_norm); next_norm is the next layer's input norm, or the final one."""
        if self.is_linear:
            a = self.self_attn(xn, batch, cache)
        else:
            a = self.self_attn(xn, batch, cache, cos_sin)
        h, yn = self.post_attention_layernorm.add_norm(xn if self.postnorm else h, a, self.attn_alpha, self.attn_beta)
        m = self.block_sparse_moe(yn)
        return next_norm.add_norm(yn if self.postnorm else h, m, self.mlp_alpha, self.mlp_beta)


class MiniMaxModel(nn.Module):
    def __init__(self, config: ModelConfig, group: Group = SINGLE, expert_parallel: bool = False,
                 quant: QuantConfig | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(DecoderLayer(config, i, group, expert_parallel, quant)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniMaxM1ForCausalLM(nn.Module):
    """forward(input_ids [T], batch, caches) -> hidden [T, hidden]; compute_logits(hidden [R, hidden]) -> fp32
    logits [R, vocab] (on rank 0 of a group; None on the other ranks).

    `parallel` says how the model splits, `group` which rank this is (default: distributed's group for
    `parallel`), `quant` whether the routed experts are 8-bit (quantization/). The caches are this rank's: `num_lightning_heads` heads per state slot, `num_kv_heads` KV heads
    per token (read by `num_q_heads` softmax query heads)."""

    def __init__(self, config: ModelConfig, parallel: ParallelConfig | None = None, group: Group | None = None,
                 quant: QuantConfig | None = None):
        super().__init__()
        parallel = parallel or ParallelConfig()
        parallel.check(config)
        group = group or tensor_parallel_group(parallel)
        if group.world_size != parallel.tensor_parallel_size:
            raise ValueError(f"a group of {group.world_size} ranks cannot build a model for "
                             f"tensor_parallel_size={parallel.tensor_parallel_size}")
        self.config, self.parallel, self.group, self.quant = config, parallel, group, quant
        self.model = MiniMaxModel(config, group, parallel.enable_expert_parallel, quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # which slice of the caches each layer owns
        self.cache_index = []
        counts = {LINEAR: 0, SOFTMAX: 0}
        for layer in self.model.layers:
            kind = LINEAR if layer.is_linear else SOFTMAX
            self.cache_index.append((kind, counts[kind]))
            counts[kind] += 1
        attn = [layer.self_attn for layer in self.model.layers]
        self.num_lightning_heads = next((a.num_heads for a in attn if isinstance(a, LightningAttention)), 0)
        self.num_q_heads = next((a.num_heads for a in attn if isinstance(a, SoftmaxAttention)), 0)
        self.num_kv_heads = next((a.num_kv_heads for a in attn if isinstance(a, SoftmaxAttention)), 0)
        self._rotary = next((a.rotary for a in attn if isinstance(a, SoftmaxAttention)), None)

    def init_buffers(self) -> None:
        """Recompute derived buffers (decay rates, rotary frequencies, expert maps) once parameters are in place."""
        for layer in self.model.layers:
            layer.self_attn.init_buffers()
            layer.block_sparse_moe.init_buffers()

    def process_weights_after_loading(self) -> None:
        """Once every weight is in place (weights.py calls it): each MoE layer's quantisation method checks and
        finishes its experts."""
        for layer in self.model.layers:
            moe = layer.block_sparse_moe
            moe.quant_method.process_weights_after_loading(moe)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, caches: Caches) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        cos_sin = self._rotary.cos_sin(batch.positions) if self._rotary is not None else None
        layers = self.model.layers
        xn = layers[0].input_layernorm(h)
        for i, (layer, (kind, idx)) in enumerate(zip(layers, self.cache_index)):
            cache = caches.lightning[idx] if kind == LINEAR else caches.kv[idx]
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h, xn = layer(h, xn, batch, cache, cos_sin, next_norm)
        return xn  # model.norm of the last layer's output

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

    # ---- checkpoint names -----------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, tuple[str, object]]:
        """Every tensor of a released checkpoint -> (parameter name, shard id for its weight_loader). With 8-bit
        experts also their per-channel scales, X.weight_scale beside each X.weight (quantization/checkpoint.py)."""
        names = {}
        for pname, _ in self.named_parameters():
            m = re.match(r"(model\.layers\.\d+\.block_sparse_moe)\.(w13|w2)(_scale)?$", pname)
            if not m:
                names[pname] = (pname, None)
                continue
            prefix, which, scale = m.groups()
            for e in range(self.config.num_local_experts):
                for part in (("w1", "w3") if which == "w13" else ("w2",)):
                    names[f"{prefix}.experts.{e}.{part}.weight{scale or ''}"] = (pname, (part, e))
        return names

    @staticmethod
    def packed_tensor(name: str) -> str | None:
        """The parameter a tensor of transformers' packed spelling fills whole (shard id None), else None."""
        m = _PACKED.match(name)
        return m and f"{m.group(1)}.block_sparse_moe.{_PACKED_PARAM[m.group(2)]}"
