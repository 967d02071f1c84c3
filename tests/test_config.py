import json

import pytest

from minimax_m1.config import (LINEAR, SOFTMAX, ConfigError, ModelConfig, lightning_slopes, minimax_m1_config)


def test_released_config(shared_model_dir):
    cfg = ModelConfig.from_file(shared_model_dir)
    assert cfg.num_hidden_layers == 80 and cfg.hidden_size == 6144 and cfg.head_dim == 128
    assert cfg.softmax_layers == list(range(7, 80, 8)) and len(cfg.linear_layers) == 70
    assert cfg.rotary_dim == 64 and cfg.rope_theta == 1e7 and cfg.postnorm
    assert cfg.linear_attn_alpha == pytest.approx(3.5565588200778455) and cfg.mlp_beta == 1.0
    preset = minimax_m1_config()
    for field in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "num_local_experts", "num_experts_per_tok", "attn_type_list", "rotary_dim", "rope_theta",
                  "postnorm", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(preset, field) == getattr(cfg, field), field
    for field in ("full_attn_alpha", "linear_attn_alpha", "mlp_alpha"):
        assert getattr(preset, field) == pytest.approx(getattr(cfg, field), rel=1e-15)


def _hf_dict(**over):
    d = {"architectures": ["MiniMaxForCausalLM"], "model_type": "minimax", "vocab_size": 100, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
         "layer_types": ["linear_attention", "full_attention"], "linear_attn_alpha_factor": 2.0,
         "mlp_beta_factor": 0.5, "rope_parameters": {"rope_theta": 1000.0, "rope_type": "default"},
         "eos_token_id": 2}
    d.update(over)
    return d


def test_transformers_spelling():
    cfg = ModelConfig.from_dict(_hf_dict())
    assert cfg.attn_type_list == [LINEAR, SOFTMAX] and cfg.postnorm
    assert cfg.rotary_dim == 8 and cfg.rope_theta == 1000.0
    assert cfg.linear_attn_alpha == 2.0 and cfg.mlp_beta == 0.5 and cfg.full_attn_alpha == 1.0
    assert cfg.eos_token_id == [2]
    partial = ModelConfig.from_dict(_hf_dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5}))
    assert partial.rotary_dim == 4


def test_released_spelling_prenorm():
    d = {"architectures": ["MiniMaxText01ForCausalLM"], "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 8, "num_local_experts": 2,
         "attn_type_list": [0, 1], "rotary_dim": 4, "rope_theta": 1e4}
    cfg = ModelConfig.from_dict(d)
    assert not cfg.postnorm and cfg.head_dim == 8 and cfg.rotary_dim == 4


@pytest.mark.parametrize("over,match", [
    ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
    ({"layer_types": ["linear_attention", "sliding_attention"]}, "sliding_attention"),
    ({"layer_types": ["linear_attention"]}, "num_hidden_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"shared_intermediate_size": 64}, "shared_intermediate_size"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, "yarn"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_unsupported_configs_say_why(over, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(_hf_dict(**over))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict()))
    assert ModelConfig.from_file(tmp_path).vocab_size == 100


def test_slopes():
    s = lightning_slopes(64, 0, 80)
    assert s[0] == pytest.approx(2 ** (-1 / 8) * (1 + 1e-5), rel=1e-12)
    assert s[63] == pytest.approx(2 ** -8 * (1 + 1e-5), rel=1e-12)
    # global layer index, denominator L - 1
    assert lightning_slopes(64, 78, 80)[0] == pytest.approx(2 ** (-1 / 8) * (1 - 78 / 79 + 1e-5), rel=1e-12)
    # a head count that is not a power of two: ALiBi's interleaving
    assert lightning_slopes(6, 0, 1) == pytest.approx([x * (1 + 1e-5) for x in
                                                       [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]])


@pytest.mark.parametrize("over,match", [
    ({"num_attention_heads": None}, r"required key num_attention_heads is missing"),
    ({"hidden_size": "32"}, r"hidden_size must be an integer, got '32' \(a JSON string\); write it without quotes"),
    ({"hidden_size": 32.5}, r"hidden_size must be an integer, got 32.5"),
    ({"num_hidden_layers": True}, r"num_hidden_layers must be an integer, got True \(a JSON boolean\)"),
    ({"vocab_size": 0}, r"vocab_size must be >= 1, got 0"),
    ({"rms_norm_eps": "1e-5"}, r"rms_norm_eps must be a number"),
    ({"layer_types": "linear_attention"}, r"layer_types must be a list of strings"),
    ({"rope_parameters": {"rope_theta": "1e4"}}, r"rope_parameters.rope_theta must be a number"),
    ({"rope_parameters": [1e4]}, r"rope_parameters must be an object"),
    ({"eos_token_id": "2"}, r"eos_token_id must be a list of integers"),
    ({"architectures": "MiniMaxForCausalLM"}, r"architectures must be a list of strings"),
    ({"head_dim": None, "hidden_size": 30}, r"head_dim is absent and hidden_size \(30\) is not a multiple"),
])
def test_bad_values_name_the_key(over, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(_hf_dict(**over))


def test_absent_key_and_null_mean_the_default():
    for d in (_hf_dict(num_key_value_heads=None, head_dim=None, bos_token_id=None, eos_token_id=None),
              {k: v for k, v in _hf_dict().items() if k not in ("num_key_value_heads", "head_dim", "eos_token_id")}):
        cfg = ModelConfig.from_dict(d)
        assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8 and cfg.eos_token_id == [] and cfg.bos_token_id is None
    assert ModelConfig.from_dict(_hf_dict(hidden_size=32.0, eos_token_id=[1, 2])).eos_token_id == [1, 2]


def test_not_an_object():
    for raw in ([_hf_dict()], "config", None):
        with pytest.raises(ConfigError, match="must be a JSON object"):
            ModelConfig.from_dict(raw)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "vocab_size": 100,\n  "hidden_size": 32\n  "num_hidden_layers": 2\n}\n')
    with pytest.raises(ConfigError, match=rf"{path} is not valid JSON: .* line 4 column 3"):
        ModelConfig.from_file(tmp_path)
    path.write_bytes(b'{"vocab_size": "\xff"}')
    with pytest.raises(ConfigError, match=rf"{path} is not UTF-8"):
        ModelConfig.from_file(path)
    path.write_text(json.dumps(_hf_dict(hidden_size="32")))
    with pytest.raises(ConfigError, match=rf"^{path}: hidden_size must be an integer"):
        ModelConfig.from_file(tmp_path)
    path.write_text(json.dumps([_hf_dict()]))
    with pytest.raises(ConfigError, match=rf"^{path}: the config must be a JSON object .* got a JSON list"):
        ModelConfig.from_file(tmp_path)
