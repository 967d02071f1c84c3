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


class UserError(Exception):
    """A mistake the user can fix: a bad file, flag or setting. The message is one line that names the thing and
    says what to do; the command line prints it (no traceback) and exits with code 2."""


class ConfigError(UserError, ValueError):
    """A config.json, or an engine setting, this engine cannot honour."""


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
        """A config.json's object in either spelling; raises ConfigError naming a missing key, a value of the
        wrong type or one this engine cannot honour."""
        if not isinstance(raw, dict):
            raise ConfigError(f"the config must be a JSON object ({{...}}), got a JSON {_json_kind(raw)}")
        r = _Reader(raw)
        archs = r.list("architectures", str, [])
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown or not archs and raw.get("model_type") not in ("minimax", "minimax_m1", "minimax_text_01"):
            raise ConfigError(
                f"unsupported architecture {unknown or raw.get('model_type')!r}: this engine runs "
                f"{', '.join(ARCHITECTURES)}"
            )
        _reject_unsupported(raw)
        hf = "attn_type_list" not in raw  # transformers' `minimax` spelling
        heads = r.int("num_attention_heads")
        hidden = r.int("hidden_size")
        head_dim = r.int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"head_dim is absent and hidden_size ({hidden}) is not a multiple of "
                                  f"num_attention_heads ({heads}): add head_dim")
            head_dim = hidden // heads
        layers = r.int("num_hidden_layers")
        if hf:
            attn_types = _layer_types(r.list("layer_types", str, None), layers)
            rope = r.dict("rope_parameters")
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"rope_type {rope_type!r} is not supported (only the default rotary)")
            theta = _Reader(rope, "rope_parameters.").float("rope_theta", r.float("rope_theta", 1e6))
            factor = _Reader(rope, "rope_parameters.").float("partial_rotary_factor",
                                                             r.float("partial_rotary_factor", 1.0))
            rotary_dim = int(head_dim * factor)
            norms = {k: r.float(f"{k}_factor", 1.0) for k in (
                "full_attn_alpha", "full_attn_beta", "linear_attn_alpha", "linear_attn_beta", "mlp_alpha", "mlp_beta")}
            postnorm = True
        else:
            attn_types = r.list("attn_type_list", int)
            theta = r.float("rope_theta", 10_000.0)
            rotary_dim = r.int("rotary_dim", None) or head_dim
            norms = {
                "full_attn_alpha": r.float("layernorm_full_attention_alpha", 1.0),
                "full_attn_beta": r.float("layernorm_full_attention_beta", 1.0),
                "linear_attn_alpha": r.float("layernorm_linear_attention_alpha", 1.0),
                "linear_attn_beta": r.float("layernorm_linear_attention_beta", 1.0),
                "mlp_alpha": r.float("layernorm_mlp_alpha", 1.0),
                "mlp_beta": r.float("layernorm_mlp_beta", 1.0),
            }
            postnorm = r.bool("postnorm", False)
        eos = raw.get("eos_token_id")  # one id or a list of them
        eos = [r.int("eos_token_id", minimum=0)] if isinstance(eos, int) else r.list("eos_token_id", int, [])
        return cls(
            vocab_size=r.int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=r.int("num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=r.int("intermediate_size"),
            num_local_experts=r.int("num_local_experts"),
            num_experts_per_tok=r.int("num_experts_per_tok", 2),
            attn_type_list=attn_types,
            rotary_dim=rotary_dim,
            rope_theta=theta,
            rms_norm_eps=r.float("rms_norm_eps", 1e-5),
            postnorm=postnorm,
            max_position_embeddings=r.int("max_position_embeddings", 10_240_000),
            tie_word_embeddings=r.bool("tie_word_embeddings", False),
            bos_token_id=r.int("bos_token_id", None, minimum=0),
            eos_token_id=eos,
            **norms,
        )

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "ModelConfig":
        """A checkpoint directory's config.json (or the file itself). Every problem is a ConfigError whose message
        starts with the file's path (FileNotFoundError when there is no file)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: a checkpoint directory needs the model's "
                                    "config.json (download it with the weights)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix it or "
                              "download the file again") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text: download the file again") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


_REQUIRED = object()


def _json_kind(value) -> str:
    """JSON's name for a Python value read from JSON."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"), (list, "list"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


class _Reader:
    """Typed reads from a config dict: a missing required key or a value of the wrong type becomes a ConfigError
    naming the key (with `prefix` for nested objects). A key present with null reads as its default."""

    def __init__(self, raw: dict, prefix: str = ""):
        self.raw, self.prefix = raw, prefix

    def _get(self, key, default):
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ConfigError(f"the required key {self.prefix}{key} is missing: add it, or download the "
                                  "model's config.json again")
            return None
        return value

    def _bad(self, key, value, want: str) -> ConfigError:
        hint = "; write it without quotes" if isinstance(value, str) and _is_number(value) else ""
        return ConfigError(f"{self.prefix}{key} must be {want}, got {value!r} (a JSON {_json_kind(value)}){hint}")

    def int(self, key, default=_REQUIRED, minimum: int = 1):
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, value, "an integer")
        if value < minimum:
            raise ConfigError(f"{self.prefix}{key} must be >= {minimum}, got {value}")
        return value

    def float(self, key, default=_REQUIRED) -> float:
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, value, "a number")
        return float(value)

    def bool(self, key, default=_REQUIRED) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool) and value not in (0, 1):
            raise self._bad(key, value, "true or false")
        return bool(value)

    def list(self, key, item: type, default=_REQUIRED):
        value = self._get(key, default)
        if value is None:
            return default
        want = f"a list of {'integers' if item is int else 'strings'}"
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item) for v in value):
            raise self._bad(key, value, want)
        return list(value)

    def dict(self, key) -> dict:
        value = self._get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, value, "an object")
        return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
            raise ConfigError(f"{key}={raw.get(key)!r} cannot be honoured: {why}")


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


# ---- quantisation -----------------------------------------------------------------------------

QUANT_METHODS = ("fp8", "experts_int8")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """8-bit routed experts (everything else stays in the model dtype, the router in fp32):
    - "fp8": W8A8 e4m3, per-output-channel fp32 weight scales, per-token dynamic activation scales;
    - "experts_int8": W8A16, symmetric per-output-channel int8 weights, activations in the model dtype.
    See quantization/ for the formats and their error bounds."""

    method: str

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quantization {self.method!r} is not supported: use one of {', '.join(QUANT_METHODS)}")

    @property
    def expert_bits(self) -> int:
        return 8

    @classmethod
    def parse(cls, value: "str | QuantConfig | None") -> "QuantConfig | None":
        """None, a method name, or a QuantConfig."""
        if value is None or isinstance(value, QuantConfig):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"quantization must be one of {', '.join(QUANT_METHODS)} or None, got {value!r}")
        return cls(value)
