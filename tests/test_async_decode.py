"""Async scheduling's device half (--async-scheduling, engine/async_decode.py) on the CPU, where steps are synchronous
so nothing overlaps but the logic is the same: a decode step launched before the previous one's tokens are read, its
inputs fed from those tokens on the device. A workload with sequences finishing at unforeseeable steps (stop
tokens), aborted and time-limited mid-flight, admitted mid-run, preempted for KV blocks, and mixed with requests the
device cannot sample alone (logprobs, penalties) gives the same tokens, finish reasons and logprobs as synchronous
steps, with and without the host half (step_ahead.py): bit for bit when every request arrives at once and has room;
when they arrive mid-run (or wait for a slot), a step that waits for the tokens in flight before admitting shifts
which requests share a batch, so logprobs agree to fp32 rounding (1e-5) and the tokens still equal. A time limit
ends a request with the tokens the host has (one fewer when one is in flight, more when arrivals moved the steps)."""
import pytest
import torch

from minimax_m1 import LLM, SamplingParams
from minimax_m1.engine.builder import ConfigError, EngineArgs
from util import small_cache_engine


def _engine(async_scheduling: bool, ahead: bool, max_num_seqs: int = 6):
    return small_cache_engine(ahead, async_scheduling, max_num_seqs)


def _requests():
    out = []
    for i in range(12):
        prompt = [(7 * i + j) % 250 for j in range(1 + (11 * i) % 37)]
        kw = dict(max_tokens=5 + (13 * i) % 30)
        if i % 3 == 0:
            kw |= dict(temperature=0, ignore_eos=True, stop_token_ids=[17, 101, 202])  # ends where it samples one
        elif i % 3 == 1:
            kw |= dict(temperature=1.0, top_p=0.9, seed=i)
        else:
            kw |= dict(temperature=0.7, top_k=20, seed=i, ignore_eos=True)
        if i == 7:
            kw |= dict(logprobs=2)  # read on the host: its steps run synchronously
        if i == 8:
            kw |= dict(repetition_penalty=1.3)
        out.append((f"r{i}", prompt, SamplingParams(**kw), i // 3 * 5))  # arrives at step i // 3 * 5
    return out


def _run(engine, arrivals: bool = True) -> dict:
    todo, done, step = [(*r[:3], r[3] if arrivals else 0) for r in _requests()], {}, 0
    while todo or engine.has_unfinished():
        while todo and todo[0][3] <= step:
            rid, prompt, params, _ = todo.pop(0)
            engine.add_request(rid, prompt, params)
        if step == 9:
            engine.abort_request("r1")
        if step == 12:
            out = engine.finish_request("r4", "length", "time limit")
            if out is not None:
                done["r4"] = (out.outputs[0].token_ids, "length", None)
        for out in engine.step():
            if out.finished:
                o = out.outputs[0]
                done[out.request_id] = (o.token_ids, o.finish_reason, o.logprobs)
        step += 1
        assert step < 3000
    return done


def _same_up_to_the_time_limit(got: dict, sync: dict, fewer: int | None) -> None:
    """r4 ends at a time limit (at a step count): async has a prefix of the synchronous tokens, at most
    `fewer` short (None: any, where arrivals shift which step call runs which model step)."""
    (tokens, reason, _), (want, want_reason, _) = got.pop("r4"), sync.pop("r4")
    assert reason == want_reason == "length" and tokens == want[:len(tokens)]
    assert fewer is None or len(want) - len(tokens) <= fewer


@pytest.mark.parametrize("arrivals", [False, True], ids=["at-once", "mid-run"])
@pytest.mark.parametrize("ahead", [False, True], ids=["fresh-inputs", "step-ahead"])
def test_same_outputs_as_synchronous_steps(ahead, arrivals):
    # at once: room for all 12 (a request that must wait for a slot joins a step later under async scheduling,
    # which moves the batches as arrivals do); mid-run: 6 at a time
    seqs = 6 if arrivals else 12
    sync = _run(_engine(False, ahead, seqs), arrivals)
    engine = _engine(True, ahead, seqs)
    got = _run(engine, arrivals)
    assert set(got) == set(sync) == {f"r{i}" for i in range(12)} - {"r1"}
    _same_up_to_the_time_limit(got, sync, None if arrivals else 1)
    if arrivals:
        for rid, (tokens, reason, logprobs) in got.items():
            assert (tokens, reason) == sync[rid][:2], rid
            for mine, theirs in zip(logprobs or [], sync[rid][2] or []):
                assert mine.keys() == theirs.keys() and all(abs(mine[k] - theirs[k]) <= 1e-5 for k in mine), rid
    else:
        assert got == sync
    assert any(reason == "stop" for _, reason, _ in got.values())  # stop tokens ended some mid-flight
    assert engine.num_async_steps >= 20 and engine.scheduler.num_preemptions > 0
    assert engine.cache.usage().state_slots == 0 and engine.cache.usage().kv_blocks == 0


def test_llm_generate_with_async_scheduling():
    prompts = [[(5 * i + j) % 256 for j in range(3 + i)] for i in range(5)]
    params = [SamplingParams(max_tokens=12 + i, temperature=0 if i % 2 else 0.9, seed=i) for i in range(5)]
    outs = {flag: [o.outputs[0].token_ids for o in LLM("tiny", device="cpu", progress=False, async_scheduling=flag)
                   .generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
            for flag in (False, True)}
    assert outs[True] == outs[False] and [len(t) for t in outs[True]] == [12, 13, 14, 15, 16]


def test_async_scheduling_needs_one_device():
    with pytest.raises(ConfigError, match="async_scheduling runs on one device"):
        EngineArgs(model="tiny", device="cpu", tensor_parallel_size=2, async_scheduling=True)


def test_async_scheduling_default_is_where_it_serves():
    """Left unset it is on with one CUDA device only (on the CPU steps are synchronous: nothing to overlap), and a
    tensor-parallel engine runs without it rather than failing."""
    assert EngineArgs(model="tiny", device="cpu").async_scheduling is False
    assert EngineArgs(model="tiny", device="cpu", tensor_parallel_size=2).async_scheduling is False
    assert EngineArgs(model="tiny", device="cpu", async_scheduling=True).async_scheduling is True
    if torch.cuda.is_available():
        assert EngineArgs(model="tiny", device="cuda").async_scheduling is True


def _failing_launches(engine, times: int):
    """engine.runner.run raises (as an out-of-memory would) on its first `times` async launches."""
    run, failures = engine.runner.run, []

    def flaky(chunks, all_logits=False, device_ids=None):
        if device_ids is not None and len(failures) < times:
            failures.append(len(chunks))
            raise RuntimeError("injected failure of an async step")
        return run(chunks, all_logits, device_ids)

    engine.runner.run = flaky
    return failures


def test_a_failed_async_step_is_recomputed_once_then_fails():
    """As any failed step (LLMEngine._step_failed): its requests are recomputed from scratch, and give the same
    tokens; a request whose step fails twice finishes with an error, the others go on."""
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)]
    prompts = [[5, 6, 7], [9, 10]]

    def run(engine):
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(f"q{i}", p, sp)
        done = {}
        for _ in range(200):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
            if not engine.has_unfinished():
                return done
        raise AssertionError("did not finish")

    want = run(_engine(False, False, 12))
    once = _engine(True, False, 12)
    failures = _failing_launches(once, 1)
    assert run(once) == want and failures == [2] and once.scheduler.num_preemptions == 2
    always = _engine(True, False, 12)
    _failing_launches(always, 10 ** 9)
    got = run(always)
    assert {rid: reason for rid, (_, reason) in got.items()} == {"q0": "error", "q1": "error"}
    assert always.cache.usage().state_slots == 0 and always.cache.usage().kv_blocks == 0
