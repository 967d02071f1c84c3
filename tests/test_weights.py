import json

import pytest
import torch
from safetensors.torch import save_file

from minimax_m1 import LLM
from minimax_m1.config import ModelConfig, minimax_m1_config
from minimax_m1.models.minimax_m1 import MiniMaxM1ForCausalLM
from minimax_m1.weights import WeightError, checkpoint_shapes, resolve

CONFIG = {"architectures": ["MiniMaxM1ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 16,
          "num_local_experts": 4, "num_experts_per_tok": 2, "attn_type_list": [0, 1], "rotary_dim": 8,
          "rope_theta": 1e4, "postnorm": True}


def _meta_model(cfg):
    with torch.device("meta"):
        return MiniMaxM1ForCausalLM(cfg)


def test_real_index_maps_every_tensor(shared_model_dir):
    names = json.loads((shared_model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(names) == 8243
    plan = resolve(_meta_model(ModelConfig.from_file(shared_model_dir)), names)
    assert len(plan) == 8243  # every tensor has a place, and (resolve raises otherwise) nothing is missing


def test_real_index_against_preset(shared_model_dir):
    names = list(json.loads((shared_model_dir / "model.safetensors.index.json").read_text())["weight_map"])
    model = _meta_model(minimax_m1_config())
    resolve(model, names)
    with pytest.raises(WeightError, match=r"missing.*model\.layers\.79\.block_sparse_moe\.experts\.31\.w3\.weight"):
        resolve(model, [n for n in names if n != "model.layers.79.block_sparse_moe.experts.31.w3.weight"])


def _released_tensors(seed=0):
    """Random tensors under the released checkpoint's names for the CONFIG model."""
    g = torch.Generator().manual_seed(seed)
    shapes = checkpoint_shapes(_meta_model(ModelConfig.from_dict(CONFIG)))
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _write(path, tensors, shards=1):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        fname = f"model-{s:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def _params(llm):
    return dict(llm.engine.runner.model.named_parameters())


def test_released_names_load_into_place(tmp_path):
    tensors = _released_tensors()
    p = _params(LLM(str(_write(tmp_path / "one", tensors)), device="cpu", dtype="float32", progress=False))
    w13 = p["model.layers.0.block_sparse_moe.w13"]
    assert torch.equal(w13[2, :16], tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"])
    assert torch.equal(w13[2, 16:], tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"])
    assert torch.equal(p["model.layers.1.block_sparse_moe.w2"][3], tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"])
    assert torch.equal(p["model.layers.1.self_attn.k_proj.weight"], tensors["model.layers.1.self_attn.k_proj.weight"])
    # sharded with an index, and bf16: the same values, rounded
    q = _params(LLM(str(_write(tmp_path / "sharded", tensors, shards=3)), device="cpu", dtype="bfloat16", progress=False))
    assert q["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(q["lm_head.weight"], tensors["lm_head.weight"].bfloat16())


def test_transformers_packed_names(tmp_path):
    tensors = _released_tensors()
    packed = {n: t for n, t in tensors.items() if "block_sparse_moe" not in n}
    for layer in range(2):
        pre = f"model.layers.{layer}.block_sparse_moe"
        packed[f"model.layers.{layer}.mlp.gate.weight"] = tensors[f"{pre}.gate.weight"]
        packed[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{pre}.experts.{e}.w1.weight"], tensors[f"{pre}.experts.{e}.w3.weight"]]) for e in range(4)])
        packed[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{pre}.experts.{e}.w2.weight"] for e in range(4)])
    packed["model.layers.0.self_attn.slope_rate"] = torch.zeros(2, 1, 1)  # derived buffers are skipped
    a = _params(LLM(str(_write(tmp_path / "released", tensors)), device="cpu", dtype="float32", progress=False))
    b = _params(LLM(str(_write(tmp_path / "packed", packed)), device="cpu", dtype="float32", progress=False))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_missing_unexpected_and_misshapen(tmp_path):
    tensors = _released_tensors()
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.o_proj.weight"]
    with pytest.raises(WeightError, match=r"1 tensor\(s\) missing.*model\.layers\.1\.self_attn\.o_proj\.weight"):
        LLM(str(_write(tmp_path / "missing", missing)), device="cpu", progress=False)
    extra = dict(tensors, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(WeightError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        LLM(str(_write(tmp_path / "extra", extra)), device="cpu", progress=False)
    bad = dict(tensors)
    bad["model.layers.0.block_sparse_moe.experts.1.w3.weight"] = torch.zeros(16, 31)
    with pytest.raises(WeightError, match=r"experts\.1\.w3\.weight.*\[16, 31\].*\[16, 32\]"):
        LLM(str(_write(tmp_path / "shape", bad)), device="cpu", progress=False)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        LLM(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(tmp_path), device="cpu")


def test_dummy_load_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    llm = LLM(str(tmp_path), device="cpu", load_format="dummy")
    assert llm.prompt_logits([1, 2, 3]).isfinite().all()
    with pytest.raises(ValueError, match="load_format"):
        LLM("minimax-m1")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_transformers_twin_shares_weights_and_matches(device):
    """The benchmark's transformers comparison runs on our parameters; on a full-rotary config its logits
    are ours (the same oracle as test_model_vs_transformers, built from our side)."""
    pytest.importorskip("transformers")
    import dataclasses

    from minimax_m1.transformers_twin import transformers_twin

    llm = LLM("tiny", device=device, dtype="float32", gpu_memory_utilization=0.2)
    model = llm.engine.runner.model
    full_rotary = dataclasses.replace(model.config, rotary_dim=model.config.head_dim)
    for layer in model.model.layers:
        if not layer.is_linear:
            layer.self_attn.rotary.rotary_dim = full_rotary.head_dim
            layer.self_attn.rotary.init_buffers()
    model.config = full_rotary
    hf = transformers_twin(model)
    assert hf.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    ids = [(7 * i) % 256 for i in range(300)]
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device=device)).logits[0]
    assert (llm.prompt_logits(ids) - ref).abs().max().item() < 1e-4
