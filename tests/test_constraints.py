"""Output constraints through the engine (the tiny model, offline): schema-constrained outputs validate for 50
seeds in one batch, regex and choice too; the grammar waits for </think>; min_tokens, logit_bias and bad_words;
max_tokens=0 scoring; the constraint math of the sampler (no NaN when blocking meets a grammar); plain data
that pickles. GPU: the mask on the CUDA-graph decode path, without a host sync."""
import json
import pickle
import re

import pytest
import torch

from minimax_m1 import LLM, SamplingParams
from minimax_m1.layers.logit_constraints import LogitConstraints, apply_constraints
from minimax_m1.structured import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,4}$"},
        "unit": {"enum": ["celsius", "kelvin"]},
        "ok": {"type": "boolean"},
        "t": {"type": "integer", "minimum": -40, "maximum": 60},
        "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}},
    },
    "required": ["name", "unit", "ok", "t", "tags"],
    "additionalProperties": False,
}
SEEDS = range(50)
ONE_TOKEN = {"prompt_token_ids": [65]}  # 50 prompts of one token: the tiny model's CPU prefill stays cheap


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", device="cpu", max_num_seqs=64)


def _check(value):
    assert set(value) == set(SCHEMA["required"]) and re.fullmatch("[a-z]{1,4}", value["name"])
    assert value["unit"] in ("celsius", "kelvin") and isinstance(value["ok"], bool)
    assert isinstance(value["t"], int) and -40 <= value["t"] <= 60
    assert len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b"}


def test_schema_outputs_validate_for_50_seeds(llm):
    # no whitespace between JSON tokens: shorter outputs, so that 50 of them stay cheap on the CPU (the grammar
    # tests in test_structured.py cover flexible whitespace for 50 seeds too)
    compact = {"json": SCHEMA, "disable_any_whitespace": True}
    params = [SamplingParams(max_tokens=400, temperature=1.0, seed=s, structured_outputs=compact) for s in SEEDS]
    outs = llm.generate([ONE_TOKEN] * len(params), params, use_tqdm=False)
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    texts = set()
    for seed, out in zip(SEEDS, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (seed, o.text)
        value = json.loads(o.text)
        _check(value)
        if jsonschema is not None:
            jsonschema.validate(value, SCHEMA)
        texts.add(o.text)
    assert len(texts) > 40  # the seeds sampled different outputs: the mask constrains, it does not dictate


def test_regex_and_choice_for_50_seeds(llm):
    regex = SamplingParams(max_tokens=40, temperature=1.0, structured_outputs={"regex": r"[0-9]{2}-[a-f]{1,3}"})
    choice = SamplingParams(max_tokens=40, temperature=1.0, structured_outputs={"choice": ["yes", "no", "maybe"]})
    for params, check in [(regex, lambda t: re.fullmatch(r"[0-9]{2}-[a-f]{1,3}", t)),
                          (choice, lambda t: t in ("yes", "no", "maybe"))]:
        batch = [SamplingParams(**{**params.__dict__, "seed": s}) for s in SEEDS]
        outs = llm.generate([ONE_TOKEN] * 50, batch, use_tqdm=False)
        for out in outs:
            assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), out.outputs[0].text


def test_grammar_starts_after_think(llm):
    tok = llm.get_tokenizer()
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    choice = {"choice": ["yes", "no"]}
    # the prompt opened <think>: the output is free until </think>, then the grammar holds (a bias on </think>
    # ends the thought at once; after it the grammar masks </think>, whatever its bias)
    out = llm.generate({"prompt_token_ids": tok.encode("Question?") + [think]},
                       SamplingParams(max_tokens=20, temperature=0, structured_outputs=choice,
                                      logit_bias={end: 100}))[0].outputs[0]
    assert out.token_ids[0] == end and out.text in ("</think>yes", "</think>no"), out.text
    # after_reasoning: the first token may open <think> (here: a bias makes it); without it, <think> is masked
    biased = SamplingParams(max_tokens=5, temperature=0, logit_bias={think: 100},
                            structured_outputs={**choice, "after_reasoning": True})
    out = llm.generate("Question?", biased)[0].outputs[0]
    assert out.token_ids[:2] == [think, think] and out.finish_reason == "length"
    plain = SamplingParams(max_tokens=5, temperature=0, logit_bias={think: 100}, structured_outputs=choice)
    assert llm.generate("Question?", plain)[0].outputs[0].text in ("yes", "no")


def test_min_tokens_logit_bias_bad_words(llm):
    tok = llm.get_tokenizer()
    eos, x = tok.eos_token_ids[0], tok.encode("x")[0]
    out = llm.generate("hi", SamplingParams(max_tokens=8, temperature=0, logit_bias={eos: 100}, min_tokens=3))[0]
    assert out.outputs[0].token_ids[3:] == [eos] and eos not in out.outputs[0].token_ids[:3]
    out = llm.generate("hi", SamplingParams(max_tokens=6, temperature=0, logit_bias={x: 100}))[0]
    assert out.outputs[0].text == "x" * 6
    out = llm.generate("hi", SamplingParams(max_tokens=6, temperature=0, logit_bias={x: 100}, bad_words=["xx"]))[0]
    assert "xx" not in out.outputs[0].text and out.outputs[0].text.startswith("x")
    # a stop string is not checked before min_tokens either
    out = llm.generate("hi", SamplingParams(max_tokens=6, temperature=0, logit_bias={x: 100}, stop=["x"],
                                            min_tokens=3))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 3


def test_max_tokens_0_scores_the_prompt(llm):
    ids = llm.get_tokenizer().encode("score me, and only me")
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    ref = llm.prompt_logits(ids).log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        assert list(out.prompt_logprobs[i]) == [ids[i]]
        assert abs(out.prompt_logprobs[i][ids[i]].logprob - ref[i - 1, ids[i]].item()) < 1e-5
    assert not llm.engine.has_unfinished() and not llm.engine.requests


def test_blocking_never_empties_a_grammar_row():
    vocab = 70
    bitmask = torch.zeros(3, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5  # row 0: the grammar allows token 5 only, which min_tokens blocks: the grammar wins
    bitmask[1, 0] = (1 << 5) | (1 << 6)  # row 1: tokens 5 and 6, 5 blocked: 6 is left
    bitmask[2] = -1  # row 2: no grammar; token 64 biased, token 3 blocked
    c = LogitConstraints(bias_rows=[2], bias_tokens=[64], bias_values=[50.0], blocked_rows=[0, 1, 2],
                         blocked_tokens=[5, 5, 3], bitmask=bitmask)
    logits = torch.randn(3, vocab)
    out = apply_constraints(logits, c)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [5]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [6]
    assert not torch.isfinite(out[2, 3]) and out[2, 64] == logits[2, 64] + 50 and torch.isfinite(out[2]).sum() == 69
    assert not out.softmax(-1).isnan().any()
    assert apply_constraints(logits, LogitConstraints()) is logits and apply_constraints(logits, None) is logits


def test_request_settings_are_plain_data():
    """What crosses to an engine process: SamplingParams with a constraint pickles; matchers live in the engine."""
    p = SamplingParams(structured_outputs={"json": SCHEMA, "after_reasoning": True}, logit_bias={"3": 1.5},
                       bad_words=["no"], min_tokens=2)
    q = pickle.loads(pickle.dumps(p))
    assert q == p and isinstance(q.structured_outputs, StructuredOutputsParams) and q.logit_bias == {3: 1.5}


@pytest.mark.gpu
def test_grammar_on_cuda_graph_decode_without_host_sync(monkeypatch):
    """On CUDA with decode graphs captured: schema outputs validate, and applying the constraints (bitmask,
    bias, blocked tokens) to the graph's logits never waits for the device."""
    import dataclasses

    from minimax_m1.engine import builder
    from test_gpu_model import _small_real_config  # the tiny vocabulary, shapes the graph path takes

    monkeypatch.setattr(builder, "tiny_config", lambda vocab: dataclasses.replace(_small_real_config(),
                                                                                 vocab_size=vocab))
    gpu = LLM("tiny", device="cuda", dtype="bfloat16", gpu_memory_utilization=0.2, max_num_seqs=16)
    assert gpu.engine.runner.graphs is not None, "decode graphs were not captured"
    import minimax_m1.layers.sampler as sampler

    real, calls = sampler.apply_constraints, []

    def no_sync(logits, c):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real(logits, c)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        calls.append(c is not None)
        return out

    monkeypatch.setattr(sampler, "apply_constraints", no_sync)
    params = [SamplingParams(max_tokens=800, temperature=1.0, seed=s, structured_outputs={"json": SCHEMA},
                             logit_bias={7: 1.0}, min_tokens=2) for s in range(16)]
    outs = gpu.generate(["Weather report as JSON:"] * 16, params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        _check(json.loads(out.outputs[0].text))
    assert sum(calls) > 16
