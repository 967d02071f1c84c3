"""The serving engine on the tiny model: continuous batching, chunked prefill, preemption, slot reuse."""
import random

import pytest
import torch

from minimax_m1 import SamplingParams
from minimax_m1.engine.builder import EngineArgs, build_engine

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
    assert engine.scheduler.kv_cache.num_free == 40 and engine.scheduler.state_pool.num_free == 64


def test_slot_reuse_starts_from_zero():
    engine = _engine(max_num_seqs=1)  # one slot: every request reuses it
    prompts = _prompts(6, seed=3, max_len=400)
    sequential = {rid: _run(engine, {rid: p})[rid] for rid, p in prompts.items()}
    for rid, p in prompts.items():
        assert _run(_engine(), {rid: p})[rid] == sequential[rid]
    # and the pool zeroes a slot it hands out
    pool = engine.scheduler.state_pool
    pool.states.fill_(1.0)
    slot = pool.allocate()
    assert torch.count_nonzero(pool.states[:, slot]) == 0
    pool.release(slot)


def test_abort_frees_slot_and_blocks():
    engine = _engine()
    pool, kv = engine.scheduler.state_pool, engine.scheduler.kv_cache
    engine.add_request("a", [i % 256 for i in range(300)], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert pool.num_free == pool.num_slots - 1 and kv.num_free < kv.num_blocks
    engine.abort_request("a")
    assert pool.num_free == pool.num_slots and kv.num_free == kv.num_blocks
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
