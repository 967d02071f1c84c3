"""8-bit checkpoints: the saved format (`minimax-m1 quantize`) round-trips exactly, loads with or without the
flag, shard by shard; fp8 checkpoints with 128x128 block scales load (requantised per channel, within e4m3's
rounding bound of their values); damaged or foreign checkpoints are refused by name.

The model here has hidden 192 and intermediate 160, so 128x128 blocks end inside the tensors."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minimax_m1 import cli
from minimax_m1.config import ConfigError, ModelConfig
from minimax_m1.engine.builder import EngineArgs, load_model
from minimax_m1.models.minimax_m1 import MiniMaxM1ForCausalLM
from minimax_m1.ops.moe import quantized as q8
from minimax_m1.quantization.checkpoint import FORMAT, is_expert_tensor
from minimax_m1.quantization.convert import quantize_checkpoint
from minimax_m1.weights import WeightError, checkpoint_shapes

CONFIG = {"architectures": ["MiniMaxM1ForCausalLM"], "vocab_size": 64, "hidden_size": 192, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 96, "intermediate_size": 160,
          "num_local_experts": 4, "num_experts_per_tok": 2, "attn_type_list": [0, 1], "rotary_dim": 32,
          "rope_theta": 1e4, "postnorm": True, "torch_dtype": "bfloat16"}
METHODS = ("fp8", "experts_int8")


def _tensors(seed=0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = checkpoint_shapes(MiniMaxM1ForCausalLM(ModelConfig.from_dict(CONFIG)))
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * s[-1] ** -0.5).bfloat16() for n, s in sorted(shapes.items())}


def _packed(tensors):
    out = {n: t for n, t in tensors.items() if "block_sparse_moe" not in n}
    for layer in range(2):
        pre = f"model.layers.{layer}.block_sparse_moe"
        w = {k: torch.stack([tensors[f"{pre}.experts.{e}.{k}.weight"] for e in range(4)]) for k in ("w1", "w2", "w3")}
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], 1)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = w["w2"]
        out[f"model.layers.{layer}.mlp.gate.weight"] = tensors[f"{pre}.gate.weight"]
    return out


def _write(path, tensors, config=CONFIG, shards=3):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        f = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names[s::shards]}, str(path / f))
        weight_map.update({n: f for n in names[s::shards]})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def _load(path, method=None, **kw):
    return load_model(EngineArgs(model=str(path), device="cpu", quantization=method, progress=False, **kw))[1]


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _same(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return [n for n in pa if pa[n].dtype != pb[n].dtype or not torch.equal(_bits(pa[n]), _bits(pb[n]))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("packed", [False, True], ids=["released", "packed"])
def test_saved_format_round_trips_exactly(tmp_path, method, packed):
    tensors = _tensors()
    src = _write(tmp_path / "src", _packed(tensors) if packed else tensors)
    dst = quantize_checkpoint(src, tmp_path / "dst", method, progress=False)
    saved_config = json.loads((dst / "config.json").read_text())
    assert saved_config["quantization_config"]["quant_method"] == method
    assert saved_config["quantization_config"]["format"] == FORMAT
    assert json.loads((dst / "generation_config.json").read_text()) == {"eos_token_id": 3}
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"model-0000{s}-of-00003.safetensors" for s in (1, 2, 3)]  # shard by shard
    for name, f in index.items():
        with safe_open(dst / f, "pt") as sf:
            t = sf.get_tensor(name)
        if is_expert_tensor(name):
            assert t.dtype == q8.WEIGHT_DTYPES[method], name
        elif name.endswith("_scale"):
            assert t.dtype == torch.float32 and is_expert_tensor(name.removesuffix("_scale").removesuffix(".weight")
                                                                + (".weight" if ".weight" in name else "")), name
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, (_packed(tensors) if packed else tensors)[name]), name
    # loading SRC with the flag (quantised while loading) and DST without it (detected) give the same model
    at_load, from_saved = _load(src, method), _load(dst)
    assert from_saved.quant.method == method
    assert _same(at_load, from_saved) == []
    assert _same(_load(dst, method), from_saved) == []  # with the same flag too


def test_saved_format_in_the_other_method(tmp_path):
    """An fp8 checkpoint asked for as experts_int8: its values (q * scale, in the model dtype) quantised to int8."""
    src = _write(tmp_path / "src", _tensors())
    dst = quantize_checkpoint(src, tmp_path / "dst", "fp8", progress=False)
    fp8, int8 = _load(dst).model.layers[0].block_sparse_moe, _load(dst, "experts_int8").model.layers[0].block_sparse_moe
    for name in ("w13", "w2"):
        values = q8.dequantize_weight(getattr(fp8, name), getattr(fp8, name + "_scale"))
        q, s = q8.quantize_weight(values, "experts_int8")
        assert torch.equal(getattr(int8, name), q) and torch.equal(getattr(int8, name + "_scale"), s)


def _block_fp8(tensors):
    """DeepSeek-V3-style fp8: every 2-D projection (experts, attention, router, head) in e4m3 with
    weight_scale_inv [ceil(N/128), ceil(K/128)]; norms and the embedding as they are."""
    out = {}
    for name, t in tensors.items():
        if t.dim() != 2 or "norm" in name or "embed" in name:
            out[name] = t
            continue
        n, k = t.shape
        nb, kb = -(-n // 128), -(-k // 128)
        padded = torch.zeros(nb * 128, kb * 128)
        padded[:n, :k] = t.float()
        blocks = padded.view(nb, 128, kb, 128)
        scale = blocks.abs().amax((1, 3)) / 448
        q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(nb * 128, kb * 128)
        out[name] = q[:n, :k].contiguous()
        out[name.removesuffix(".weight") + ".weight_scale_inv"] = scale
    return out


def _block_values(q, scale):
    """An independent dequantisation of a block-scaled tensor."""
    s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:q.shape[0], :q.shape[1]]
    return q.float() * s


@pytest.mark.parametrize("method", METHODS)
def test_block_scaled_fp8_checkpoint(tmp_path, method):
    fp8 = _block_fp8(_tensors())
    config = dict(CONFIG, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128],
                                               "activation_scheme": "dynamic", "fmt": "e4m3"})
    src = _write(tmp_path / "src", fp8, config)
    model = _load(src, method if method != "fp8" else None)  # without a flag the checkpoint's method: fp8
    assert model.quant.method == method
    params = dict(model.named_parameters())
    attn = "model.layers.1.self_attn.q_proj.weight"  # non-expert tensors: their values, in the model dtype
    assert torch.equal(params[attn], _block_values(fp8[attn], fp8[attn[:-len(".weight")] + ".weight_scale_inv"]))
    moe = model.model.layers[0].block_sparse_moe
    pre = "model.layers.0.block_sparse_moe.experts.2"
    for part, rows in (("w1", slice(0, 160)), ("w3", slice(160, 320))):
        values = _block_values(fp8[f"{pre}.{part}.weight"], fp8[f"{pre}.{part}.weight_scale_inv"])
        q, s = q8.quantize_weight(values, method)
        assert torch.equal(_bits(moe.w13[2, rows]), _bits(q)) and torch.equal(moe.w13_scale[2, rows], s)
        # requantising per channel costs at most one more rounding of the format
        err = (q8.dequantize_weight(moe.w13[2, rows], moe.w13_scale[2, rows]) - values).abs()
        s = moe.w13_scale[2, rows, None]
        bound = (torch.maximum(values.abs() * 2 ** -4, s * 2 ** -10) if method == "fp8" else s / 2)
        assert bool((err <= bound + 2 ** -22 * values.abs()).all())
    # and it converts to the saved format, which then loads exactly as it loads in the checkpoint dtype (the
    # conversion rounds the block-dequantised values to bf16, as a bf16 model does)
    dst = quantize_checkpoint(src, tmp_path / "dst", method, progress=False)
    assert _same(_load(dst, dtype="bfloat16"), _load(src, method, dtype="bfloat16")) == []


def test_quantize_command(tmp_path, capsys):
    src = _write(tmp_path / "src", _tensors())
    assert cli.main(["quantize", str(src), str(tmp_path / "dst"), "--quantization", "experts_int8"]) == 0
    assert "--quantization experts_int8" in capsys.readouterr().out
    assert cli.main(["quantize", str(src), str(tmp_path / "dst"), "--quantization", "experts_int8"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path / "dst"), str(tmp_path / "again"), "--quantization",
                     "experts_int8"]) == 2
    assert "already holds experts_int8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", str(src), str(tmp_path / "x"), "--quantization", "int4"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_generate_flag(capsys):
    assert cli.main(["generate", "--model", "tiny", "--device", "cpu", "--prompt", "hi", "--max-tokens", "3",
                     "--quantization", "fp8"]) == 0


def test_damaged_and_foreign_checkpoints(tmp_path):
    src = _write(tmp_path / "src", _tensors())
    dst = quantize_checkpoint(src, tmp_path / "dst", "fp8", progress=False)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    scale = "model.layers.1.block_sparse_moe.experts.3.w2.weight_scale"
    f = dst / index["weight_map"][scale]
    tensors = load_file(f)
    del tensors[scale]
    save_file(tensors, str(f))
    del index["weight_map"][scale]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match=r"8-bit tensor\(s\) without their scales.*experts\.3\.w2\.weight"):
        _load(dst)
    foreign = json.loads((src / "config.json").read_text())
    foreign["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (src / "config.json").write_text(json.dumps(foreign))
    with pytest.raises(ConfigError, match="awq"):
        _load(src)
