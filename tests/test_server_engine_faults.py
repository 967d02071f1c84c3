"""The engine's fault isolation under the server, without HTTP (so it also runs on a GPU machine that has no
fastapi): a request whose sampling or detokenising raises finishes alone with finish_reason "error", the
others' tokens unchanged; a model step that raises preempts its requests once (an out-of-memory costs a
recompute, not the requests) and fails them if it happens again; bounds that depend on the vocabulary."""
import pytest
import torch

from minimax_m1 import SamplingParams
from minimax_m1.engine.builder import EngineArgs, build_engine

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
POISON = 4242


def _engine(device):
    return build_engine(EngineArgs(model="tiny", device=device, max_model_len=512, progress=False))


def _run(engine, requests: dict) -> dict:
    """requests: {id: (prompt ids, params)} -> {id: final CompletionOutput}."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return done


@pytest.mark.parametrize("device", DEVICES)
def test_a_request_failing_in_sampling_or_detokenising_fails_alone(device, monkeypatch):
    engine = _engine(device)
    prompts = {"a": [1, 2, 3], "b": list(range(40, 90))}
    alone = {rid: _run(engine, {rid: (p, GREEDY)})[rid].token_ids for rid, p in prompts.items()}
    real_sample, real_append = engine.runner.sample, engine._append

    def sample(logits, seqs):
        if any(s.params.seed == POISON for s in seqs):
            raise RuntimeError("sampling blew up")
        return real_sample(logits, seqs)

    def append(seq, token, logprobs):
        if seq.params.seed == POISON + 1 and len(seq.output_token_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return real_append(seq, token, logprobs)

    monkeypatch.setattr(engine.runner, "sample", sample)
    monkeypatch.setattr(engine, "_append", append)
    out = _run(engine, {"a": (prompts["a"], GREEDY), "b": (prompts["b"], GREEDY),
                        "bad-sample": ([5, 6], SamplingParams(max_tokens=10, seed=POISON)),
                        "bad-detok": ([7, 8], SamplingParams(max_tokens=10, seed=POISON + 1))})
    assert out["a"].token_ids == alone["a"] and out["b"].token_ids == alone["b"]
    assert out["bad-sample"].finish_reason == "error" and "sampling blew up" in out["bad-sample"].error
    assert out["bad-detok"].finish_reason == "error" and "UnicodeDecodeError" in out["bad-detok"].error
    assert len(out["bad-detok"].token_ids) == 3  # what it had before the failure
    usage = engine.cache.usage()
    assert not engine.requests and usage.state_slots == 0 and usage.kv_blocks == 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_failing_model_step_preempts_once_then_fails(device, monkeypatch):
    engine = _engine(device)
    prompt = list(range(10, 60))
    expected = _run(engine, {"x": (prompt, GREEDY)})["x"].token_ids
    real_run, calls = engine.runner.run, {"oom": 0}

    def run(chunks, all_logits=False, **kwargs):  # kwargs: device_ids, from async scheduling (on with CUDA)
        rids = {c.seq.request_id for c in chunks}
        if "flaky" in rids and calls["oom"] < 1 and any(c.seq.output_token_ids for c in chunks):
            calls["oom"] += 1  # in a decode step: the recompute covers the prompt and the output so far
            raise torch.OutOfMemoryError("simulated out of memory")
        if "broken" in rids:
            raise RuntimeError("this request always breaks the step")
        return real_run(chunks, all_logits, **kwargs)

    monkeypatch.setattr(engine.runner, "run", run)
    preemptions = engine.scheduler.num_preemptions
    out = _run(engine, {"flaky": (prompt, GREEDY)})
    assert out["flaky"].finish_reason == "length" and out["flaky"].token_ids == expected
    assert engine.scheduler.num_preemptions == preemptions + 1
    out = _run(engine, {"broken": (prompt, GREEDY)})
    assert out["broken"].finish_reason == "error" and "always breaks the step" in out["broken"].error
    assert _run(engine, {"after": (prompt, GREEDY)})["after"].token_ids == expected
    usage = engine.cache.usage()
    assert usage.state_slots == 0 and usage.kv_blocks == 0


def test_finish_request_and_vocabulary_bounds():
    engine = _engine("cpu")
    engine.add_request("long", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    out = engine.finish_request("long", "length", "max_request_seconds")
    assert out.finished and out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 2
    assert out.outputs[0].stop_reason == "max_request_seconds" and not engine.has_unfinished()
    assert engine.finish_request("long", "length") is None
    vocab = engine.vocab_size
    for params, match in [(SamplingParams(top_k=vocab + 1), "top_k"),
                          (SamplingParams(stop_token_ids=[vocab]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", [1], params)
    engine.add_request("ok", [1], SamplingParams(top_k=vocab, stop_token_ids=[vocab - 1], max_tokens=1))
    for kwargs, match in [(dict(top_k=10**20), "top_k"), (dict(seed=2**64), "seed"), (dict(max_tokens=2**31), "max_tokens"),
                          (dict(max_tokens=True), "max_tokens"), (dict(stop=["x"] * 65), "stop"),
                          (dict(stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
