"""Memory plans with 8-bit experts: the whole MiniMax-M1 (its released config.json) on 80 GB cards and H200s,
computed without a GPU, and the start-up check counting 8-bit experts.

A plan's budget per card: gpu_memory_utilization (0.9, the default) of the card's memory (nvidia-smi's totals:
81559 MiB for an 80 GB H100, 143771 MiB for an H200) less RESERVE for what the engine measures at start-up
rather than plans (one 8192-token step's activations, CUDA graph pools, NCCL and cuBLAS workspaces); with
experts_int8 also the transient bf16 copy of one layer's w13 the large-batch path makes (ops/moe/quantized.py).
The longest context is what one request's KV may take of the rest (memory.MemoryEstimate.longest_context).
"""
import json

import pytest
import torch

from minimax_m1.config import ModelConfig, minimax_m1_config
from minimax_m1.engine import builder, memory
from parallel_util import released_config_json, split_config

GB, MiB = 10**9, 2**20
H100, H200 = 81559 * MiB, 143771 * MiB
RESERVE = 4 * GB
ONE_MILLION = 1 << 20  # MiniMax-M1's advertised context


def _int8_scratch(cfg: ModelConfig, tp: int) -> int:
    return cfg.num_local_experts * 2 * (cfg.intermediate_size // tp) * cfg.hidden_size * 2


PLANS = [  # (card, its memory, tp, method)
    ("80 GB", H100, 8, "fp8"), ("80 GB", H100, 8, "experts_int8"), ("H200", H200, 4, "fp8"),
    ("H200", H200, 8, None)]


def plan(cfg: ModelConfig, card: int, tp: int, method: str | None) -> tuple[memory.MemoryEstimate, int]:
    est = memory.estimate(cfg, torch.bfloat16, tp=tp, expert_bits=8 if method else None)
    budget = int(0.9 * card) - RESERVE - (_int8_scratch(cfg, tp) if method == "experts_int8" else 0)
    return est, budget


def test_whole_model_plans(shared_model_dir):
    cfg = ModelConfig.from_file(shared_model_dir)
    for name, card, tp, method in PLANS:
        est, budget = plan(cfg, card, tp, method)
        one, full = est.longest_context(budget, 1), est.longest_context(budget, 64)
        print(f"TP{tp} on {name} cards, {method or 'bf16'} experts: {memory.gb(est.weights)} of weights per rank, "
              f"budget {memory.gb(budget)}: longest context {one} tokens for one request, {full} with 64 "
              f"requests' states")
        assert est.needed <= budget, (name, tp, method)
        assert one >= ONE_MILLION, (name, tp, method, one)
    # and what does not fit: bf16 at TP8 on 80 GB cards, 8-bit experts at TP4 on them
    for tp, bits in ((8, None), (4, 8)):
        est = memory.estimate(cfg, torch.bfloat16, tp=tp, expert_bits=bits)
        assert est.needed > int(0.9 * H100) - RESERVE, (tp, bits)


def test_start_up_check_counts_8bit_experts(monkeypatch, tmp_path):
    """load_model checks the plan with 8-bit experts when asked for them, or when the checkpoint holds them,
    before it allocates anything."""
    seen = []

    class Stop(Exception):
        pass

    def check(*args, **kwargs):
        seen.append(kwargs["expert_bits"])
        raise Stop

    monkeypatch.setattr(builder, "check_fits", check)
    for method in (None, "fp8", "experts_int8"):
        with pytest.raises(Stop):
            builder.load_model(builder.EngineArgs(model="minimax-m1", load_format="dummy", device="cpu",
                                                  quantization=method))
    (tmp_path / "config.json").write_text(json.dumps(dict(released_config_json(split_config()),
                                                          quantization_config={"quant_method": "fp8"})))
    with pytest.raises(Stop):
        builder.load_model(builder.EngineArgs(model=str(tmp_path), device="cpu"))
    assert seen == [None, 8, 8, 8]


def test_refusal_names_the_8bit_size(monkeypatch):
    """456.1B parameters: 435B experts at one byte plus their scales (0.25 GB), the rest in bf16."""
    cfg = minimax_m1_config()
    monkeypatch.setattr(memory, "device_memory", lambda device: (200 * GB, 400 * GB))
    with pytest.raises(memory.NotEnoughMemory, match=r"needs 478 GB in bf16 with 8-bit experts"):
        memory.check_fits(cfg, "MiniMax-M1", torch.bfloat16, "cpu", expert_bits=8)
