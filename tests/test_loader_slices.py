"""What each rank reads and holds, in one process (emulated ranks: a rank's share built alone, collectives
skipped): every tensor's planned boxes tile it (each element read by exactly one rank, or by every rank for
the replicated norms and routers), every rank's parameters are tiled by what it reads, the dummy weights of
a rank are the TP=1 model's sliced, and ParallelConfig names what cannot be split."""
import dataclasses
import json

import pytest
import torch

from parallel_util import Runner, build, split_config
from minimax_m1.config import ConfigError, ModelConfig, ParallelConfig, minimax_m1_config
from minimax_m1.distributed import SINGLE, emulated, multi_gpu_env, tensor_parallel_group
from minimax_m1.models.minimax_m1 import MiniMaxM1ForCausalLM
from minimax_m1.weights import checkpoint_shapes, resolve

REPLICATED = ("layernorm.weight", "model.norm.weight", ".gate.weight")  # whole on every rank
KV = (".k_proj.weight", ".v_proj.weight")


def _rank_model(config, n, ep, rank, device="meta"):
    with torch.device(device):
        return MiniMaxM1ForCausalLM(config, ParallelConfig(n, ep, emulate_rank=rank), emulated(rank, n))


def _volume(b) -> int:
    v = 1
    for s in b:
        v *= s.stop - s.start
    return v


def _disjoint(boxes) -> bool:
    return not any(all(a.start < b.stop and b.start < a.stop for a, b in zip(x, y))
                   for i, x in enumerate(boxes) for y in boxes[i + 1:])


def _inside(b, shape) -> bool:
    return len(b) == len(shape) and all(0 <= s.start < s.stop <= n for s, n in zip(b, shape))


def check_plans(config: ModelConfig, n: int, ep: bool, names) -> dict[int, dict[str, list]]:
    """Plan every rank's reads of the checkpoint tensors `names` (no data read) and check that the boxes tile
    each tensor and each rank's parameters exactly. Returns {rank: {tensor: its source boxes}}."""
    shapes = resolve_shapes(config, names)
    reads = {}
    for rank in range(n):
        model = _rank_model(config, n, ep, rank)
        params = dict(model.named_parameters())
        written = {p: [] for p in params}
        reads[rank] = {}
        for name, (pname, shard) in resolve(model, names).items():
            shape, pieces = params[pname].load_plan(shard)
            assert shape == shapes[name], name
            assert all(_inside(src, shape) for src, _ in pieces), name
            reads[rank][name] = [src for src, _ in pieces]
            written[pname] += [dst for _, dst in pieces]
        for pname, boxes in written.items():
            p, module = params[pname], model.get_submodule(pname.rsplit(".", 1)[0])
            want = p.numel()
            if hasattr(module, "rows_per_rank"):  # vocab shards: the padded tail is never loaded
                want = (module.end - module.start) * p.shape[1]
            assert all(_inside(b, p.shape) for b in boxes) and _disjoint(boxes), (rank, pname)
            assert sum(map(_volume, boxes)) == want, (rank, pname, sum(map(_volume, boxes)), want)
    kv_copies = max(1, n // config.num_key_value_heads)  # ranks that hold each KV head
    for name in reads[0]:
        boxes = [tuple((s.start, s.stop) for s in b) for r in range(n) for b in reads[r][name]]
        distinct = sorted(set(boxes))
        copies = {boxes.count(b) for b in distinct}
        total = 1
        for d in shapes[name]:
            total *= d
        # each element read by the same number of ranks: all (replicated), those of its KV head, or one
        want = n if name.endswith(REPLICATED) else kv_copies if name.endswith(KV) else 1
        assert copies == {want}, (name, copies, want)
        distinct = [tuple(slice(a, b) for a, b in d) for d in distinct]
        assert _disjoint(distinct) and sum(map(_volume, distinct)) == total, name
    return reads


def resolve_shapes(config, names) -> dict[str, tuple]:
    """Whole shapes of checkpoint tensors of either spelling."""
    with torch.device("meta"):
        model = MiniMaxM1ForCausalLM(config)
    params = dict(model.named_parameters())
    return {name: params[p].load_plan(shard)[0] for name, (p, shard) in resolve(model, names).items()}


def _packed_names(config) -> list[str]:
    with torch.device("meta"):
        names = [n for n in checkpoint_shapes(MiniMaxM1ForCausalLM(config)) if "block_sparse_moe" not in n]
    for layer in range(config.num_hidden_layers):
        names += [f"model.layers.{layer}.mlp.{t}" for t in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")]
    return names


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_tiny_plans_tile(n, ep, kv_heads):
    config = split_config(kv_heads)
    with torch.device("meta"):
        released = list(checkpoint_shapes(MiniMaxM1ForCausalLM(config)))
    check_plans(config, n, ep, released)
    check_plans(config, n, ep, _packed_names(config))


@pytest.mark.parametrize("ep", [False, True])
def test_real_index_every_rank_gets_its_slices(shared_model_dir, ep):
    """TP8 and EP8 of the released 80-layer checkpoint (8243 tensors), planned from the index alone."""
    names = list(json.loads((shared_model_dir / "model.safetensors.index.json").read_text())["weight_map"])
    config = ModelConfig.from_file(shared_model_dir)
    reads = check_plans(config, 8, ep, names)
    assert all(len(r) == 8243 for r in reads.values())
    q = "model.layers.7.self_attn.q_proj.weight"
    w1 = "model.layers.3.block_sparse_moe.experts.13.w1.weight"
    w2 = "model.layers.3.block_sparse_moe.experts.13.w2.weight"
    assert reads[3][q] == [(slice(3 * 1024, 4 * 1024), slice(0, 6144))]
    assert reads[3]["model.layers.0.self_attn.qkv_proj.weight"] == [(slice(3 * 3072, 4 * 3072), slice(0, 6144))]
    assert reads[3]["lm_head.weight"] == [(slice(3 * 25008, 4 * 25008), slice(0, 6144))]
    if ep:  # experts 12..15 on rank 3, whole; nothing of them elsewhere
        assert reads[3][w1] == [(slice(0, 9216), slice(0, 6144))]
        assert all(reads[r][w1] == [] for r in range(8) if r != 3)
    else:  # every expert on every rank, rows / columns 3*1152 .. 4*1152
        assert reads[3][w1] == [(slice(3 * 1152, 4 * 1152), slice(0, 6144))]
        assert reads[3][w2] == [(slice(0, 6144), slice(3 * 1152, 4 * 1152))]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_dummy_rank_is_tp1_sliced(n, ep, kv_heads):
    config = split_config(kv_heads)
    one = build(config, ParallelConfig(), SINGLE)
    p1 = dict(one.named_parameters())
    full = {}
    for name, (pname, shard) in one.checkpoint_tensors().items():
        shape, [(src, dst)] = p1[pname].load_plan(shard)
        full[name] = p1[pname][dst].reshape(shape)
    for rank in range(n):
        model = build(config, ParallelConfig(n, ep, emulate_rank=rank), emulated(rank, n))
        params = dict(model.named_parameters())
        for name, (pname, shard) in model.checkpoint_tensors().items():
            for src, dst in params[pname].load_plan(shard)[1]:
                got = params[pname][dst]
                assert torch.equal(got, full[name][src].reshape(got.shape)), (rank, name)


def test_dummy_values():
    """Uniform with the variance of N(0, 1/fan_in), the same wherever a box is cut."""
    from minimax_m1.weights import _DummyTensor

    t = _DummyTensor("model.layers.0.block_sparse_moe.experts.0.w1.weight", (9216, 6144), 0, "cpu")
    block = t[(slice(1000, 1512), slice(0, 6144))]
    assert abs(block.mean().item()) < 2e-4 and abs(block.std().item() * 6144 ** 0.5 - 1) < 1e-2
    assert block.abs().max().item() <= 3 ** 0.5 / 6144 ** 0.5
    assert torch.equal(t[(slice(1200, 1300), slice(7, 4000))], block[200:300, 7:4000])
    other = _DummyTensor("model.layers.0.block_sparse_moe.experts.1.w1.weight", (9216, 6144), 0, "cpu")
    assert not torch.equal(other[(slice(1000, 1512), slice(0, 6144))], block)


def test_emulated_rank_runs_alone():
    """Rank 3 of 4 built and run by itself: its share of the heads and vocabulary, collectives skipped."""
    config = split_config(2)
    model = build(config, ParallelConfig(4, True, emulate_rank=3), emulated(3, 4))
    assert (model.num_lightning_heads, model.num_kv_heads) == (2, 1)
    assert [l.block_sparse_moe.first_expert for l in model.model.layers] == [6] * 4
    r = Runner(model, 1, 32)
    logits = r.step([(r.seq(list(range(20)), 0), 20)])
    assert logits.shape == (1, 251 - 3 * 63) and logits.isfinite().all()


def test_load_model_builds_one_rank():
    from minimax_m1.engine.builder import EngineArgs, load_model

    args = EngineArgs(model="tiny", device="cpu", progress=False)
    _, whole, _, _ = load_model(args)
    _, half, _, _ = load_model(args, ParallelConfig(2, emulate_rank=1))
    assert half.num_lightning_heads == whole.num_lightning_heads // 2
    q = "model.layers.3.self_attn.q_proj.weight"
    rows = half.get_parameter(q).shape[0]
    assert torch.equal(half.get_parameter(q), whole.get_parameter(q)[rows:])


def test_parallel_config_errors():
    m1 = minimax_m1_config()
    for n in (1, 2, 4, 8, 16, 32, 64):
        ParallelConfig(n).check(m1)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3 .*num_attention_heads \(64\).*Sizes that work: "
                                          r"\[1, 2, 4, 8, 16, 32, 64\]"):
        ParallelConfig(3).check(m1)
    with pytest.raises(ConfigError, match=r"num_local_experts \(32\).*whole experts"):
        ParallelConfig(64, enable_expert_parallel=True).check(m1)
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(3\) neither divides it"):
        ParallelConfig(2).check(dataclasses.replace(split_config(), num_attention_heads=24, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="tensor_parallel_size must be an integer >= 1"):
        ParallelConfig(0)
    with pytest.raises(ConfigError, match=r"emulate_rank must be a rank in \[0, 2\)"):
        ParallelConfig(2, emulate_rank=2)
    with pytest.raises(ConfigError, match="init_distributed"):
        tensor_parallel_group(ParallelConfig(2))
    with pytest.raises(ConfigError, match="intermediate_size"):
        MiniMaxM1ForCausalLM(split_config(), ParallelConfig(3, emulate_rank=0))


def test_collectives_are_no_ops_without_communication():
    x = torch.arange(6.0).view(2, 3)
    for group in (SINGLE, emulated(1, 4)):
        assert group.all_reduce(x) is x and group.all_gather(x) is x and group.gather(x) is x
    env = multi_gpu_env({})
    assert env == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@pytest.mark.gpu
@pytest.mark.parametrize("ep", [False, True])
def test_emulated_tp8_rank_of_the_whole_model(ep):
    """Rank 0 of TP8 (or EP8) of all 80 layers, bf16 dummy weights, built and run alone on one GPU (the
    rank-emulation benchmark's model): about 114 GB, generated on the GPU in seconds, with the host holding
    no weights; a prefill and decode steps run on its per-rank shapes."""
    import resource
    import time

    from minimax_m1.engine.builder import EngineArgs, build_model
    from minimax_m1.weights import init_dummy

    if torch.cuda.mem_get_info()[0] < 125e9:
        pytest.skip("needs a GPU with 125 GB free (one rank of TP8 is about 114 GB)")
    args = EngineArgs(model="minimax-m1", device="cuda", dtype="bfloat16", load_format="dummy")
    start = time.perf_counter()
    model = build_model(minimax_m1_config(), args, ParallelConfig(8, ep, emulate_rank=0)).eval()
    init_dummy(model, 0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"ep={ep}: {size / 1e9:.1f} GB of weights in {seconds:.1f} s, host peak RSS {host / 1e9:.2f} GB")
    assert 110e9 < size < 118e9 and seconds < 120 and host < 8e9
    r = Runner(model, 4, 2048, 256)
    seqs = [r.seq([(7 * i + j) % 1000 for j in range(700)], i) for i in range(4)]
    assert r.step([(s, 700) for s in seqs]).isfinite().all()
    for _ in range(3):
        for s in seqs:
            s.token_ids.append(5)
        logits = r.step([(s, 1) for s in seqs])
    assert logits.shape == (4, 25008) and logits.isfinite().all()
    del model, r
    torch.cuda.empty_cache()
