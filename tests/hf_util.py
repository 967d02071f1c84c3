"""Tiny transformers MiniMaxForCausalLM checkpoints for oracle tests."""
import torch

from minimax_m1.config import lightning_slopes

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


def tiny_hf_model(seed: int = 0, vocab: int = 300, layer_types=LAYER_TYPES):
    transformers = __import__("pytest").importorskip("transformers")
    torch.manual_seed(seed)
    alpha = (2 * len(layer_types)) ** 0.25
    cfg = transformers.MiniMaxConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=layer_types, full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha,
        mlp_alpha_factor=alpha, max_position_embeddings=8192, initializer_range=0.1, eos_token_id=None,
        bos_token_id=None)
    model = transformers.MiniMaxForCausalLM(cfg).eval()
    use_authors_slopes(model)
    return model


def use_authors_slopes(model) -> None:
    """transformers computes the layer factor as 1 - l/(L-1+1e-5) + 1e-5; the authors' code (and this
    engine) use 1 - l/(L-1) + 1e-5. The gap is ~1e-5 relative except at the last layer, where the factor
    itself is ~1e-5 and differs by a third; give the oracle the authors' rates."""
    n = model.config.num_hidden_layers
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if hasattr(attn, "slope_rate"):
            s = torch.tensor(lightning_slopes(attn.num_attention_heads, i, n), dtype=torch.float32)[:, None, None]
            q, k, d = attn.decay_factors(s)
            for name, val in (("slope_rate", s), ("query_decay", q), ("key_decay", k), ("diagonal_decay", d)):
                getattr(attn, name).copy_(val)
