"""Model configuration, read from a checkpoint's config.json in either spelling.

- The released MiniMax-M1 / MiniMax-Text-01 spelling: `attn_type_list`, `layernorm_*_alpha/beta`,
  `postnorm`, `rotary_dim`, `rope_theta`.
- transformers' `minimax` spelling: `layer_types`, `*_factor`, `rope_parameters`, always postnorm,
  rotary over the whole head unless a partial factor is given.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

ARCHITECTURES = ("MiniMaxM1ForCausalLM", "MiniMaxText01ForCausalLM", "MiniMaxForCausalLM")
LINEAR, SOFTMAX = 0, 1  # attn_type_list values: lightning (linear) attention, softmax attention
_LAYER_TYPES = {"linear_attention": LINEAR, "full_attention": SOFTMAX}


class ConfigError(ValueError):
    """A config.json this engine cannot honour."""


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # per expert
    num_local_experts: int
    num_experts_per_tok: int
    attn_type_list: list[int]
    rotary_dim: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6  # the lightning output RMSNorm (the reference's; vLLM used 1e-5)
    postnorm: bool = True
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    max_position_embeddings: int = 10_240_000
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = dataclasses.field(default_factory=list)
    # A slice of a larger model (benchmarks): its layer i is layer layer_offset + i of a model with
    # full_num_layers layers, which is what the lightning decay rates are computed from.
    layer_offset: int = 0
    full_num_layers: int | None = None

    def global_layer(self, i: int) -> tuple[int, int]:
        """(global index, layer count) of layer i, for the decay-rate formula."""
        return self.layer_offset + i, self.full_num_layers or self.num_hidden_layers

    def __post_init__(self):
        if len(self.attn_type_list) != self.num_hidden_layers:
            raise ConfigError(
                f"attn_type_list has {len(self.attn_type_list)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if any(t not in (LINEAR, SOFTMAX) for t in self.attn_type_list):
            raise ConfigError(f"attn_type_list may hold only 0 (lightning) and 1 (softmax), got {self.attn_type_list}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts="
                f"{self.num_local_experts}]"
            )

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.attn_type_list) if t == LINEAR]

    @property
    def softmax_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.attn_type_list) if t == SOFTMAX]

    # ---- reading config.json ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown or not archs and raw.get("model_type") not in ("minimax", "minimax_m1", "minimax_text_01"):
            raise ConfigError(
                f"unsupported architecture {unknown or raw.get('model_type')!r}: this engine runs "
                f"{', '.join(ARCHITECTURES)}"
            )
        _reject_unsupported(raw)
        hf = "attn_type_list" not in raw  # transformers' `minimax` spelling
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        layers = raw["num_hidden_layers"]
        if hf:
            attn_types = _layer_types(raw.get("layer_types"), layers)
            rope = raw.get("rope_parameters") or {}
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported (only the default rotary)")
            theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
            factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
            rotary_dim = int(head_dim * factor)
            norms = {k: raw.get(f"{k}_factor", 1.0) for k in (
                "full_attn_alpha", "full_attn_beta", "linear_attn_alpha", "linear_attn_beta", "mlp_alpha", "mlp_beta")}
            postnorm = True
        else:
            attn_types = [int(t) for t in raw["attn_type_list"]]
            theta = raw.get("rope_theta", 10_000.0)
            rotary_dim = raw.get("rotary_dim") or head_dim
            norms = {
                "full_attn_alpha": raw.get("layernorm_full_attention_alpha", 1.0),
                "full_attn_beta": raw.get("layernorm_full_attention_beta", 1.0),
                "linear_attn_alpha": raw.get("layernorm_linear_attention_alpha", 1.0),
                "linear_attn_beta": raw.get("layernorm_linear_attention_beta", 1.0),
                "mlp_alpha": raw.get("layernorm_mlp_alpha", 1.0),
                "mlp_beta": raw.get("layernorm_mlp_beta", 1.0),
            }
            postnorm = bool(raw.get("postnorm", False))
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=raw["intermediate_size"],
            num_local_experts=raw["num_local_experts"],
            num_experts_per_tok=raw.get("num_experts_per_tok", 2),
            attn_type_list=attn_types,
            rotary_dim=rotary_dim,
            rope_theta=float(theta),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            postnorm=postnorm,
            max_position_embeddings=raw.get("max_position_embeddings", 10_240_000),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
            **{k: float(v) for k, v in norms.items()},
        )

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "ModelConfig":
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _layer_types(types, layers: int) -> list[int]:
    if types is None:  # transformers' default: full attention on even layers
        return [SOFTMAX if i % 2 == 0 else LINEAR for i in range(layers)]
    bad = [t for t in types if t not in _LAYER_TYPES]
    if bad:
        raise ConfigError(f"unknown layer_types {sorted(set(bad))}: expected 'linear_attention' or 'full_attention'")
    return [_LAYER_TYPES[t] for t in types]


def _reject_unsupported(raw: dict[str, Any]) -> None:
    checks = [
        ("hidden_act", raw.get("hidden_act", "silu") == "silu", "only silu experts are defined"),
        ("shared_intermediate_size", not raw.get("shared_intermediate_size"), "shared experts are not supported"),
        ("sliding_window", raw.get("sliding_window") is None, "sliding-window attention is not part of MiniMax-M1"),
        ("rope_scaling", raw.get("rope_scaling") is None, "rope scaling is not supported"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config.json has {key}={raw.get(key)!r}, which this engine cannot honour: {why}")


# ---- presets ----------------------------------------------------------------------------------

def minimax_m1_config(num_hidden_layers: int = 80) -> ModelConfig:
    """The released MiniMax-M1 shapes (every 8th layer, 7, 15, ..., 79, is softmax attention)."""
    alpha = (2 * 80) ** 0.25  # DeepNorm alpha of the 80-layer model, 3.5565588200778455
    return ModelConfig(
        vocab_size=200064, hidden_size=6144, num_hidden_layers=num_hidden_layers, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, intermediate_size=9216, num_local_experts=32, num_experts_per_tok=2,
        attn_type_list=[SOFTMAX if i % 8 == 7 else LINEAR for i in range(num_hidden_layers)],
        rotary_dim=64, rope_theta=10_000_000.0, rms_norm_eps=1e-5, postnorm=True,
        full_attn_alpha=alpha, linear_attn_alpha=alpha, mlp_alpha=alpha, max_position_embeddings=10_240_000,
    )


def minimax_m1_slice(start: int, end: int) -> ModelConfig:
    """Layers [start, end) of MiniMax-M1 with the real shapes, embedding and head (for benchmarks on one GPU:
    every layer has the same shapes, so a slice's time per layer predicts the whole model's)."""
    full = minimax_m1_config()
    if not 0 <= start < end <= full.num_hidden_layers:
        raise ConfigError(f"a slice of MiniMax-M1 needs 0 <= start < end <= 80, got {start}-{end}")
    return dataclasses.replace(full, num_hidden_layers=end - start, attn_type_list=full.attn_type_list[start:end],
                               layer_offset=start, full_num_layers=full.num_hidden_layers)


def tiny_config(vocab_size: int) -> ModelConfig:
    """A small model with M1's structure (lightning layers then a softmax layer, partial rotary, DeepNorm)."""
    layers = 4
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
        attn_type_list=[LINEAR, LINEAR, LINEAR, SOFTMAX], rotary_dim=8, rope_theta=10_000_000.0, postnorm=True,
        full_attn_alpha=(2 * layers) ** 0.25, linear_attn_alpha=(2 * layers) ** 0.25, mlp_alpha=(2 * layers) ** 0.25,
        max_position_embeddings=1 << 20,
    )


def lightning_slopes(num_heads: int, layer: int, num_layers: int) -> list[float]:
    """Per-head decay rates of lightning layer `layer` (its GLOBAL index), already times the layer factor:
    s_h = base_h * (1 - layer/(L-1) + 1e-5), base_h the ALiBi slopes (2^(-8(h+1)/H) for H a power of two)."""
    factor = 1 + 1e-5 if num_layers <= 1 else 1 - layer / (num_layers - 1) + 1e-5
    return [s * factor for s in _alibi_slopes(num_heads)]


def _alibi_slopes(n: int) -> list[float]:
    def power_of_two(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


# ---- parallelism ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one model splits over N = tensor_parallel_size ranks (distributed.Group).

    Attention heads, the vocabulary and the lightning output norm are split N ways; without expert parallelism
    every expert's intermediate dim is too (I/N per rank, all experts on every rank). With
    enable_expert_parallel each rank holds E/N whole experts instead, over the same N ranks (as vLLM: EP uses
    the TP group). emulate_rank r builds and runs only rank r's share, with collectives skipped (one-device
    benchmarks of one rank)."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    emulate_rank: int | None = None

    def __post_init__(self):
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {n!r}")
        if self.emulate_rank is not None and not (isinstance(self.emulate_rank, int) and 0 <= self.emulate_rank < n):
            raise ConfigError(f"emulate_rank must be a rank in [0, {n}), got {self.emulate_rank!r}")

    def check(self, model: ModelConfig) -> None:
        """Raise ConfigError naming the dimension (and the sizes that work) when `model` cannot be split this way."""
        problems = self._problems(model)
        if problems:
            sizes = [m for m in range(1, 2 * model.num_attention_heads + 1)
                     if not dataclasses.replace(self, tensor_parallel_size=m, emulate_rank=None)._problems(model)]
            raise ConfigError(f"tensor_parallel_size={self.tensor_parallel_size} cannot split this model: "
                              f"{'; '.join(problems)}. Sizes that work: {sizes}")

    def _problems(self, model: ModelConfig) -> list[str]:
        n, problems = self.tensor_parallel_size, []
        if model.num_attention_heads % n:
            problems.append(f"num_attention_heads ({model.num_attention_heads}) is not divisible by it")
        kv = model.num_key_value_heads
        if kv % n and n % kv:  # KV heads split when n <= kv, each replicated on n/kv ranks when n > kv
            problems.append(f"num_key_value_heads ({kv}) neither divides it nor is divisible by it")
        if self.enable_expert_parallel and model.num_local_experts % n:
            problems.append(f"num_local_experts ({model.num_local_experts}) is not divisible by it "
                            f"(expert parallelism gives each rank whole experts)")
        if not self.enable_expert_parallel and model.intermediate_size % n:
            problems.append(f"intermediate_size ({model.intermediate_size}) is not divisible by it")
        return problems
