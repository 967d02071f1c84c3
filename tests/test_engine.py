"""The serving engine on the tiny model: continuous batching, chunked prefill, preemption, slot reuse, the
cache manager, the inputs a decode graph reads."""
import dataclasses
import random

import pytest
import torch

from minimax_m1 import SamplingParams
from minimax_m1.config import tiny_config
from minimax_m1.engine.builder import EngineArgs, build_engine
from minimax_m1.engine.cache import CacheManager, CacheUsage
from minimax_m1.engine.cuda_graph import StaticInputs
from minimax_m1.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(**kw):
    return build_engine(EngineArgs(model="tiny", progress=False, **kw))


def _run(engine, requests, arrivals=None):
    """requests: {id: prompt ids}; arrivals: {id: step at which it is added}. Returns {id: token ids}."""
    arrivals = arrivals or {rid: 0 for rid in requests}
    done, step = {}, 0
    while len(done) < len(requests):
        for rid, at in arrivals.items():
            if at == step:
                engine.add_request(rid, requests[rid], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
        assert step < 10_000
    return done


def _prompts(n, seed=0, max_len=1500):
    rng = random.Random(seed)
    lengths = [1, max_len, 2, 255, 256, 257] + [rng.randint(1, max_len) for _ in range(n - 6)]
    return {f"r{i}": [rng.randrange(0, 256) for _ in range(lengths[i])] for i in range(n)}


@pytest.fixture(scope="module")
def alone():
    """Each request's greedy tokens when it runs by itself."""
    engine = _engine()
    return {rid: _run(engine, {rid: p})[rid] for rid, p in _prompts(16).items()}


def test_batch_invariance_with_staggered_arrivals(alone):
    prompts = _prompts(16)
    arrivals = {rid: 3 * i for i, rid in enumerate(prompts)}
    together = _run(_engine(max_num_batched_tokens=2048), prompts, arrivals)
    assert together == alone


def test_chunked_prefill_small_budget(alone):
    prompts = _prompts(16)
    engine = _engine(max_num_batched_tokens=64)
    assert _run(engine, prompts) == alone


def test_preemption_under_tiny_kv_budget(alone):
    prompts = _prompts(16)
    engine = _engine(num_kv_blocks=40, block_size=64)  # 2560 tokens of KV for ~10k tokens of requests
    assert _run(engine, prompts) == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache.num_free_blocks == 40 and engine.cache.num_free_slots == 64


def test_slot_reuse_starts_from_zero():
    engine = _engine(max_num_seqs=1)  # one slot: every request reuses it
    prompts = _prompts(6, seed=3, max_len=400)
    sequential = {rid: _run(engine, {rid: p})[rid] for rid, p in prompts.items()}
    for rid, p in prompts.items():
        assert _run(_engine(), {rid: p})[rid] == sequential[rid]
    # and the pool zeroes a slot it hands out
    pool = engine.cache.state_pool
    pool.states.fill_(1.0)
    slot = pool.allocate()
    assert torch.count_nonzero(pool.states[:, slot]) == 0
    pool.release(slot)


def test_abort_frees_slot_and_blocks():
    engine = _engine()
    cache = engine.cache
    engine.add_request("a", [i % 256 for i in range(300)], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert cache.num_free_slots == cache.num_slots - 1 and cache.num_free_blocks < cache.num_blocks
    assert cache.usage().state_slots > 0 and cache.usage().kv_blocks > 0
    engine.abort_request("a")
    assert cache.num_free_slots == cache.num_slots and cache.num_free_blocks == cache.num_blocks
    assert cache.usage() == CacheUsage(state_slots=0.0, kv_blocks=0.0)
    assert not engine.has_unfinished()


def test_request_longer_than_kv_is_rejected():
    engine = _engine(num_kv_blocks=2, block_size=16)
    assert engine.max_model_len == 32
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [1], GREEDY)
        engine.add_request("x", [1], GREEDY)


def test_max_model_len_stops_generation():
    engine = _engine(max_model_len=20)
    out = _run(engine, {"a": list(range(15))})
    assert len(out["a"]) == 5


def test_decode_steps_do_not_recompute_the_prefix():
    """After the prefill, each step feeds the model one token per request: the lightning layers carry the
    prefix in their state and the softmax layers in the KV cache."""
    engine = _engine()
    model = engine.runner.model
    sizes, decode_flags = [], []
    original = model.forward

    def spy(input_ids, batch, caches):
        sizes.append(input_ids.shape[0])
        decode_flags.append(batch.is_decode)
        return original(input_ids, batch, caches)

    model.forward = spy
    _run(engine, {"a": [i % 256 for i in range(700)], "b": [5] * 300})
    assert sizes[0] == 1000 and all(n == 2 for n in sizes[1:]) and len(sizes) == 12
    assert decode_flags[1:] == [True] * 11


def test_cache_manager_allocates_grows_and_releases():
    cache = CacheManager.for_model(tiny_config(256), num_slots=2, num_blocks=5, block_size=16, dtype=torch.float32,
                                   device="cpu")
    a, b, c = (Sequence(rid, [1] * 10, SamplingParams()) for rid in "abc")
    cache.state_pool.states.fill_(1.0)
    assert cache.allocate(a, 20) and len(a.blocks) == 2 and torch.count_nonzero(cache.state_pool.states[:, a.state_slot]) == 0
    assert cache.usage() == CacheUsage(state_slots=0.5, kv_blocks=0.4)
    assert cache.grow(a, 33) and len(a.blocks) == 3 and cache.grow(a, 30) and len(a.blocks) == 3
    # too few blocks: nothing is taken
    assert not cache.allocate(b, 48) and b.state_slot == -1 and b.blocks == [] and cache.num_free_blocks == 2
    assert not cache.grow(a, 81) and len(a.blocks) == 3
    assert cache.allocate(b, 32) and not set(a.blocks) & set(b.blocks)
    assert not cache.allocate(c, 1)  # no state slot left
    assert cache.fits(80) and not cache.fits(81)
    assert all(cache.kv_cache.ref_counts[blk] == 1 for blk in a.blocks + b.blocks)
    cache.release(a)
    cache.release(a)  # holding nothing is fine
    cache.release(b)
    assert cache.usage() == CacheUsage(state_slots=0.0, kv_blocks=0.0) and cache.kv_cache.ref_counts == [0] * 5
    with pytest.raises(AssertionError, match="not held"):
        cache.kv_cache.release([0])


def test_graph_inputs_give_the_eager_step():
    """What a captured graph reads (the batch padded to the graph's size, in the static buffers, with stale
    block-table columns) is the padded eager step, exactly; that gives the unpadded step's logits (to fp32
    rounding: the GEMMs see 8 rows instead of 3), and its padding rows write only the scratch block."""
    engine = _engine()
    for rid, n in (("a", 300), ("b", 20), ("c", 513)):
        engine.add_request(rid, [(7 * i + len(rid)) % 256 for i in range(n)], GREEDY)
    engine.step()  # the prefills, and a first token each
    chunks = engine.scheduler.schedule()
    assert len(chunks) == 3 and all(c.num_tokens == 1 and c.completes for c in chunks)
    runner, caches, scratch = engine.runner, engine.cache.caches, engine.cache.scratch_block
    saved = caches.lightning.clone(), caches.kv.clone()

    def step(input_ids, batch):
        caches.lightning.copy_(saved[0])
        caches.kv.copy_(saved[1])
        with torch.inference_mode():
            return runner._forward(input_ids, batch), caches.lightning.clone(), caches.kv.clone()

    want = step(*runner.prepare_inputs(chunks).to_device("cpu"))
    padded = runner.prepare_inputs(chunks, pad_to=8)
    assert padded.shape.num_seqs == 8 and padded.seq_lens == [1] * 8
    eager = step(*padded.to_device("cpu"))
    static = StaticInputs(16, engine.cache.blocks_needed(engine.max_model_len), scratch, "cpu")
    static.block_tables.fill_(2**30)  # what earlier steps may leave past a row's blocks: read, it would fail
    static.load(padded)
    ids, graph_batch = static.batch(8, engine.max_model_len)
    assert graph_batch.seq_lens is None and graph_batch.context_len_bound == engine.max_model_len
    # the CPU reference attention loops over the sequences on the host: give it their lengths
    graph = step(ids, dataclasses.replace(graph_batch, seq_lens=padded.seq_lens, context_lens=padded.context_lens))
    assert all(torch.equal(a, b) for a, b in zip(graph, eager))
    assert (eager[0][:3] - want[0]).abs().max() < 1e-5
    # the padding rows: no state slot, KV into the scratch block only
    slots = [c.seq.state_slot for c in chunks]
    changed = (eager[1] != saved[0]).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert changed == sorted(slots)
    bs = engine.cache.block_size
    real = {c.seq.blocks[c.seq.num_computed // bs] * bs + c.seq.num_computed % bs for c in chunks}
    written = set((eager[2] != saved[1]).flatten(4).any(-1).any(0).any(0).flatten().nonzero().flatten().tolist())
    assert written == real | {scratch * bs}  # the padding rows sit at position 0 of the scratch block
