"""Async scheduling's host half (engine/step_ahead.py) on the CPU, where steps are synchronous so the overlap
is nil but the logic is the same: every step whose inputs were prepared ahead gets exactly the buffers a
fresh preparation gives, and a workload with sequences finishing, crossing into new KV blocks, preempted and
admitted mid-run yields the same tokens with and without it."""
import torch

from minimax_m1 import SamplingParams
from util import small_cache_engine


def _requests():
    out = []
    for i in range(10):
        prompt = [(7 * i + j) % 250 for j in range(1 + (11 * i) % 37)]
        params = (SamplingParams(max_tokens=5 + (13 * i) % 30, temperature=0, ignore_eos=True) if i % 2 else
                  SamplingParams(max_tokens=5 + (13 * i) % 30, temperature=1.0, top_p=0.9, seed=i))
        out.append((f"r{i}", prompt, params, i // 3 * 4))  # arrives at step i // 3 * 4
    return out


def _run(engine, check=None) -> dict:
    todo, done, step = _requests(), {}, 0
    while todo or engine.has_unfinished():
        while todo and todo[0][3] <= step:
            rid, prompt, params, _ = todo.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
        assert step < 2000
    return done


def test_prepared_ahead_inputs_are_the_fresh_ones_and_tokens_are_unchanged():
    engine = small_cache_engine(ahead=True)
    runner, used = engine.runner, []
    real = runner._inputs

    def checked(chunks, all_logits=False, pad_to=None):
        hits = runner.ahead.hits
        inputs = real(chunks, all_logits, pad_to)
        if runner.ahead.hits > hits:  # the guess was used: it must be what a fresh preparation gives
            fresh = runner.prepare_inputs(chunks, all_logits, pad_to)
            assert inputs.shape == fresh.shape and inputs.seq_lens == fresh.seq_lens
            assert inputs.context_lens == fresh.context_lens
            assert torch.equal(inputs.i64, fresh.i64) and torch.equal(inputs.i32, fresh.i32)
            used.append(len(chunks))
        return inputs

    runner._inputs = checked
    got = _run(engine)
    a = runner.ahead
    assert a.hits == len(used) > 20 and a.misses > 5 and a.new_blocks >= 3, (a.hits, a.misses, a.new_blocks)
    # the same workload with synchronous scheduling: the same tokens, the same preemptions
    without = small_cache_engine(ahead=False)
    assert _run(without) == got and len(got) == 10
    assert engine.scheduler.num_preemptions == without.scheduler.num_preemptions > 0
