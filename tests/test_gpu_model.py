"""The GPU path of the model (kernels, flash attention over the paged KV, grouped GEMM, decode CUDA graphs)
against the CPU reference path. Needs a CUDA GPU: CI skips these."""
import dataclasses
import gc

import pytest
import torch

from minimax_m1 import LLM, SamplingParams
from minimax_m1.config import LINEAR, SOFTMAX, tiny_config
from minimax_m1.engine.builder import EngineArgs, build_engine
from minimax_m1.ops.paged_attention import paged_attention, reference_paged_attention, write_kv
from util import rel_err

pytestmark = pytest.mark.gpu


def test_tiny_fp32_gpu_matches_cpu():
    ids = [(i * 37) % 256 for i in range(700)]
    cpu = LLM("tiny", device="cpu", dtype="float32")
    gpu = LLM("tiny", device="cuda", dtype="float32", gpu_memory_utilization=0.2)
    a, b = cpu.prompt_logits(ids), gpu.prompt_logits(ids).cpu()
    assert (a - b).abs().max().item() < 1e-4
    p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    assert cpu.generate(prompt_token_ids=ids[:50], sampling_params=p)[0].outputs[0].token_ids == \
        gpu.generate(prompt_token_ids=ids[:50], sampling_params=p)[0].outputs[0].token_ids


def test_paged_flash_attention_matches_reference():
    """Mixed batch: a fresh prompt, a continuing chunk and two decode rows, over scattered blocks."""
    torch.manual_seed(0)
    hq, hkv, d, bs = 8, 2, 128, 256
    kv = torch.zeros(2, 40, bs, hkv, d, dtype=torch.bfloat16, device="cuda")
    seqs = [(0, 300), (500, 700), (1000, 1), (37, 1)]  # (already cached, new)
    tables, free = [], list(range(39, -1, -1))
    for done, new in seqs:
        tables.append([free.pop() for _ in range(-(-(done + new) // bs))])
    width = max(map(len, tables))
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    # fill the cached part, then write the new tokens through write_kv
    slot_mapping, cu = [], [0]
    for (done, new), t in zip(seqs, tables):
        for p in range(done):
            kv[:, t[p // bs], p % bs] = torch.randn(2, hkv, d, dtype=torch.bfloat16, device="cuda")
        slot_mapping += [t[p // bs] * bs + p % bs for p in range(done, done + new)]
        cu.append(cu[-1] + new)
    n = cu[-1]
    q = torch.randn(n, hq, d, dtype=torch.bfloat16, device="cuda")
    k, v = torch.randn(2, n, hkv, d, dtype=torch.bfloat16, device="cuda")
    write_kv(kv, k, v, torch.tensor(slot_mapping, device="cuda"))
    ctx = [a + b for a, b in seqs]
    seq_lens = [b for _, b in seqs]
    out = paged_attention(q, kv, table_t, torch.tensor(cu, dtype=torch.int32, device="cuda"),
                          torch.tensor(ctx, dtype=torch.int32, device="cuda"), d ** -0.5, max_seqlen_q=max(seq_lens),
                          max_seqlen_k=max(ctx), is_decode=False, seq_lens=seq_lens, host_context_lens=ctx)
    ref = reference_paged_attention(q.float(), kv.float(), table_t, seq_lens, ctx, d ** -0.5)
    assert rel_err(out, ref) < 1e-2


def _small_real_config():
    """M1's head_dim (128, what the kernels serve) at a small width."""
    cfg = tiny_config(262)
    return dataclasses.replace(cfg, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                               rotary_dim=64, intermediate_size=256, attn_type_list=[LINEAR, LINEAR, LINEAR, SOFTMAX])


def test_decode_graphs_match_eager(monkeypatch):
    from minimax_m1.engine import builder

    monkeypatch.setattr(builder, "tiny_config", lambda vocab: dataclasses.replace(_small_real_config(),
                                                                                 vocab_size=vocab))
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    prompts = {f"r{i}": [(i * 13 + j) % 256 for j in range(1 + 97 * i)] for i in range(5)}
    results = []
    for eager in (False, True):  # one engine at a time: each sizes its caches from the free memory
        engine = build_engine(EngineArgs(model="tiny", device="cuda", dtype="bfloat16", max_num_seqs=16,
                                         enforce_eager=eager, gpu_memory_utilization=0.2))
        assert (engine.runner.graphs is None) == eager, "decode graphs were not captured"
        for rid, ids in prompts.items():
            engine.add_request(rid, ids, p)
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        results.append(done)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    for rid in prompts:
        g, e = results[0][rid], results[1][rid]
        # The same kernels; only the paged decode's split of the context may differ (it follows the
        # max_context argument), so the tokens agree unless two candidates are within rounding of a tie.
        for i, (a, b) in enumerate(zip(g.token_ids, e.token_ids)):
            if a != b:
                assert abs(g.logprobs[i][a] - e.logprobs[i][b]) < 0.05, (rid, i, g.token_ids, e.token_ids)
                break


def test_graph_replay_allocates_nothing_on_the_device(monkeypatch):
    """A replay copies the step's pinned host buffers into the graph's static ones (the block tables through a
    device-side copy): no device allocation between preparing the step and replaying it."""
    from minimax_m1.engine import builder

    monkeypatch.setattr(builder, "tiny_config", lambda vocab: dataclasses.replace(_small_real_config(),
                                                                                 vocab_size=vocab))
    engine = build_engine(EngineArgs(model="tiny", device="cuda", dtype="bfloat16", max_num_seqs=16,
                                     gpu_memory_utilization=0.2))
    runner = engine.runner
    assert runner.graphs is not None, "decode graphs were not captured"
    for i in range(5):
        engine.add_request(f"r{i}", [(i * 13 + j) % 256 for j in range(1 + 97 * i)],
                           SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()  # the prefills
    chunks = engine.scheduler.schedule()
    assert len(chunks) == 5 and runner._graphable(chunks)
    inputs = runner.prepare_inputs(chunks, pad_to=runner.graphs.padded_size(len(chunks)))
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]  # allocations made so far
    runner.graphs.run(inputs)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
