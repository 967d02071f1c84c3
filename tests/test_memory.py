"""The memory estimate (engine/memory.py) against the model card and the model itself, and the refusal before
any allocation."""
import dataclasses
import resource

import pytest
import torch

from minimax_m1 import LLM
from minimax_m1.config import ModelConfig, minimax_m1_config, minimax_m1_slice, tiny_config
from minimax_m1.engine import builder, memory
from minimax_m1.models.minimax_m1 import MiniMaxM1ForCausalLM

GB, MiB, KiB = 10**9, 2**20, 2**10


def _meta_model(config, dtype=torch.float32):
    with torch.device("meta"):
        return MiniMaxM1ForCausalLM(config).to(dtype)


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_model_card_numbers():
    """docs/minimax-m1.md: 456.1B parameters, 912 GB in bf16, about 477 GB with 8-bit experts (435B of them),
    280 MiB of lightning state per sequence, 40 KiB of KV per token."""
    cfg = minimax_m1_config()
    counts = memory.parameter_counts(cfg)
    assert round(counts.total / 1e9, 1) == 456.1
    assert round(counts.experts / 1e9) == 435
    assert round(memory.weight_bytes(cfg, torch.bfloat16) / GB) == 912
    # 8-bit experts: 477 GB, and their fp32 per-channel scales (80 layers x 32 experts x (2 * 9216 + 6144)) on top
    scales = memory.expert_scale_count(cfg)
    assert scales == 80 * 32 * (2 * 9216 + 6144)
    assert round((memory.weight_bytes(cfg, torch.bfloat16, expert_bits=8) - 4 * scales) / GB) == 477
    assert memory.cache_bytes_per_slot(cfg) == 280 * MiB
    assert memory.kv_bytes_per_token(cfg, torch.bfloat16) == 40 * KiB
    assert memory.kv_bytes_per_token(cfg, torch.float32) == 80 * KiB


def test_released_config_gives_the_same(shared_model_dir):
    released, preset = ModelConfig.from_file(shared_model_dir), minimax_m1_config()
    for tp in (1, 8):
        assert memory.weight_bytes(released, torch.bfloat16, tp) == memory.weight_bytes(preset, torch.bfloat16, tp)
        assert memory.cache_bytes_per_slot(released, tp) == memory.cache_bytes_per_slot(preset, tp)


@pytest.mark.parametrize("config", [
    tiny_config(300), minimax_m1_slice(5, 9),  # both layer kinds, the real shapes
    dataclasses.replace(tiny_config(300), tie_word_embeddings=True),
], ids=["tiny", "m1-slice", "tied"])
def test_counts_equal_the_built_model(config):
    """At tp=1 the estimate is exactly the parameters the model builds, in each dtype and with an fp32 head."""
    for dtype in (torch.float32, torch.bfloat16):
        model = _meta_model(config, dtype)
        assert memory.parameter_counts(config).total == sum(p.numel() for p in model.parameters())
        assert memory.weight_bytes(config, dtype) == _bytes(model)
        if not config.tie_word_embeddings:
            model.lm_head.float()
            assert memory.weight_bytes(config, dtype, head_fp32=True) == _bytes(model)


def test_per_rank_shares():
    cfg = minimax_m1_config()
    bf16 = torch.bfloat16
    whole = memory.parameter_counts(cfg)
    replicated = whole.router + whole.norms
    for tp in (2, 4, 8):
        rank = memory.parameter_counts(cfg, tp)
        # everything but the router and the hidden-size norms splits evenly over the ranks
        assert tp * (rank.total - rank.router - rank.norms) == whole.total - replicated
        assert rank.router == whole.router and rank.norms == whole.norms
        # expert parallelism holds whole experts: the same bytes per rank when tp divides the expert count
        assert memory.parameter_counts(cfg, tp, ep=True) == rank
        assert memory.cache_bytes_per_slot(cfg, tp) * tp == 280 * MiB
    assert round(memory.weight_bytes(cfg, bf16, tp=8) / GB) == 114  # the parallel issue's "about 114 GB"
    # 8 KV heads: one per rank at TP8, replicated beyond
    assert memory.kv_bytes_per_token(cfg, bf16, 8) == 5 * KiB == memory.kv_bytes_per_token(cfg, bf16, 16)
    # 32 experts over 12 ranks: the busiest rank holds 3
    assert memory.parameter_counts(cfg, 12, ep=True).experts == 80 * 3 * 3 * 9216 * 6144
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        memory.parameter_counts(cfg, 0)


def test_what_fits_where():
    """Whole-model plans without a GPU: TP8 bf16 on H200 (141 GB) fits, on 80 GB cards it does not; 8-bit experts
    at TP4 fit H200s. The longest context is whole KV blocks of the budget left."""
    cfg = minimax_m1_config()
    h200, h100 = 141 * GB * 0.9, 80 * GB * 0.9
    tp8 = memory.estimate(cfg, torch.bfloat16, tp=8)
    assert tp8.needed < h200 and tp8.needed > h100
    assert memory.estimate(cfg, torch.bfloat16, tp=4, expert_bits=8).needed < h200
    ctx = tp8.longest_context(int(h200), num_seqs=64)
    left = int(h200) - tp8.weights - 64 * tp8.state_slot
    assert ctx % 256 == 0 and ctx * tp8.kv_per_token <= left < (ctx + 256) * tp8.kv_per_token
    assert tp8.longest_context(tp8.weights) == 0
    assert memory.estimate(dataclasses.replace(tiny_config(300), num_hidden_layers=3, attn_type_list=[0] * 3),
                           torch.float32).longest_context(GB) is None  # no softmax layer: context is free


def _free(n_bytes, total=None):
    return lambda device: (n_bytes, total or 2 * n_bytes)


def test_refusal_message(monkeypatch):
    cfg = minimax_m1_config()
    monkeypatch.setattr(memory, "device_memory", _free(23 * GB))
    with pytest.raises(memory.NotEnoughMemory) as e:
        memory.check_fits(cfg, "minimax-m1", torch.bfloat16, "cpu")
    assert str(e.value) == ("minimax-m1 needs 912 GB in bf16 (weights) + 0.3 GB (one request's cache); this device "
                            "(cpu) has 23.0 GB free; use a device with more memory")
    assert isinstance(e.value, MemoryError)
    # the options that shrink a model are named once the engine has them
    with pytest.raises(memory.NotEnoughMemory, match=r"8-bit experts \(weights per rank of 8\) .* see "
                                                     r"--tensor-parallel-size / --quantization$"):
        memory.check_fits(cfg, "minimax-m1", torch.bfloat16, "cpu", tp=8, expert_bits=8,
                          options={"tensor_parallel_size": 8, "quantization": "fp8"})
    # fp32 that would fit in bf16 says so
    small = minimax_m1_slice(3, 4)
    need_bf16 = memory.estimate(small, torch.bfloat16).needed
    monkeypatch.setattr(memory, "device_memory", _free(need_bf16 + GB))
    with pytest.raises(memory.NotEnoughMemory, match=r"in fp32 .* see --dtype bfloat16$"):
        memory.check_fits(small, "minimax-m1:3-4", torch.float32, "cpu")
    assert memory.check_fits(small, "minimax-m1:3-4", torch.bfloat16, "cpu").needed == need_bf16


def test_gpu_budget_leaves_the_utilisation_share(monkeypatch):
    """On CUDA the engine may use free - (1 - gpu_memory_utilization) * total (no GPU needed: memory is stubbed)."""
    cfg = minimax_m1_slice(3, 8)
    need = memory.estimate(cfg, torch.bfloat16).needed
    monkeypatch.setattr(memory, "device_memory", _free(need + 5 * GB, 100 * GB))
    assert memory.check_fits(cfg, "s", torch.bfloat16, "cuda:0", gpu_memory_utilization=1.0).needed == need
    with pytest.raises(memory.NotEnoughMemory, match=r"this device \(cuda:0\) has .* GB free, .* GB of it within "
                                                     r"gpu_memory_utilization=0.9"):
        memory.check_fits(cfg, "s", torch.bfloat16, "cuda:0", gpu_memory_utilization=0.9)


def test_cpu_memory_is_read():
    free, total = memory.device_memory("cpu")
    assert 0 < free <= total
    assert memory.device_memory("meta") is None


def test_real_shapes_refused_before_allocating(monkeypatch):
    """LLM("minimax-m1", load_format="dummy") on a machine with too little memory stops with the estimate before
    the model is even built (the model class is replaced by one that fails), and its memory does not grow."""
    monkeypatch.setattr(memory, "device_memory", _free(16 * GB))

    def build(*a, **k):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(builder, "MiniMaxM1ForCausalLM", build)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(memory.NotEnoughMemory, match=r"^minimax-m1 needs 1824 GB in fp32 \(weights\) \+ 0.3 GB"):
        LLM("minimax-m1", load_format="dummy", device="cpu")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # KiB: under 1 GiB more


def test_tiny_passes_the_check():
    llm = LLM("tiny", device="cpu")
    assert llm.generate(["Hi"])[0].outputs[0].token_ids


# ---- progress on long work ---------------------------------------------------------------------

def test_dummy_init_progress_bar(capsys, monkeypatch):
    """A model past _DUMMY_PROGRESS_BYTES shows a bar in bytes (lowered here so that tiny counts as large);
    progress=False, and small models by default, stay quiet."""
    from minimax_m1 import weights

    cfg = tiny_config(300)
    model = MiniMaxM1ForCausalLM(cfg)
    weights.init_dummy(model, seed=3)
    assert capsys.readouterr().err == ""
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(weights, "_DUMMY_PROGRESS_BYTES", 0)
    weights.init_dummy(model, seed=3, progress=False)
    assert capsys.readouterr().err == ""
    weights.init_dummy(model, seed=3)
    err = capsys.readouterr().err
    assert "Initialising dummy weights" in err and "100%" in err
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())  # the bar changes nothing
