"""transformers' MiniMaxForCausalLM on this model's weights (shared, not copied): the comparison model of
the tests and of `minimax-m1 bench`."""
from __future__ import annotations

import torch

from .config import LINEAR


def transformers_twin(model):
    """transformers' MiniMaxForCausalLM holding this model's parameters (shared, not copied), with the
    authors' decay rates. Faithful only where rotary covers the whole head (transformers ignores rotary_dim)."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.MiniMaxConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_local_experts=cfg.num_local_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, rms_norm_eps=cfg.rms_norm_eps,
        layer_types=["linear_attention" if t == LINEAR else "full_attention" for t in cfg.attn_type_list],
        full_attn_alpha_factor=cfg.full_attn_alpha, full_attn_beta_factor=cfg.full_attn_beta,
        linear_attn_alpha_factor=cfg.linear_attn_alpha, linear_attn_beta_factor=cfg.linear_attn_beta,
        mlp_alpha_factor=cfg.mlp_alpha, mlp_beta_factor=cfg.mlp_beta,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
    with torch.device("meta"):
        hf = transformers.MiniMaxForCausalLM(hf_cfg)
    ours = dict(model.named_parameters())
    dev = model.lm_head.weight.device
    for name, module in hf.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:  # e.g. nn.Linear(bias=False) registers its bias as None
                continue
            full = _our_name(f"{name}.{pname}" if name else pname)
            if full not in ours and pname == "bias":  # some transformers releases give projections a bias
                module._parameters[pname] = torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=dev))
                continue
            module._parameters[pname] = ours[full]
    layers = dict(zip(hf.model.layers, model.model.layers))
    for hf_layer, our_layer in layers.items():  # derived buffers, recomputed on the device
        attn = hf_layer.self_attn
        if hasattr(attn, "get_slope_rate"):
            s = our_layer.self_attn.slopes.float().cpu()[:, None, None]  # some releases build on the CPU
            for bname, val in zip(("slope_rate", "query_decay", "key_decay", "diagonal_decay"),
                                  (s, *attn.decay_factors(s))):
                setattr(attn, bname, val.to(dev, model.lm_head.weight.dtype))  # as transformers' .to(dtype)
    rotary = hf.model.rotary_emb
    inv, _ = rotary.compute_default_rope_parameters(hf_cfg)
    rotary.inv_freq, rotary.original_inv_freq = inv.to(dev), inv.to(dev)
    return hf.eval()


def _our_name(hf_name: str) -> str:
    return (hf_name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.w13")
            .replace(".mlp.experts.down_proj", ".block_sparse_moe.w2")
            .replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight"))
