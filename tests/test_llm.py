"""The offline API on the built-in tiny model."""
import pytest
import torch

from minimax_m1 import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny")


def test_generate_shapes_and_greedy_determinism(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(["Hello", "The quick brown fox"], params)
    assert len(outs) == 2
    for o in outs:
        assert len(o.outputs[0].token_ids) == 12 and isinstance(o.outputs[0].text, str)
        assert o.outputs[0].finish_reason == "length" and o.finished
    again = llm.generate("The quick brown fox", params)[0]
    assert again.outputs[0].token_ids == outs[1].outputs[0].token_ids
    ids = llm.get_tokenizer().encode("Hello")
    by_ids = llm.generate(prompt_token_ids=ids, sampling_params=params)[0]
    assert by_ids.outputs[0].token_ids == outs[0].outputs[0].token_ids and by_ids.prompt_token_ids == ids


def test_tiny_is_the_same_model_every_time(llm):
    other = LLM("tiny")
    ids = list(range(50, 90))
    assert torch.equal(llm.prompt_logits(ids), other.prompt_logits(ids))


def test_prompt_logits_are_next_token_logits(llm):
    ids = llm.get_tokenizer().encode("abc def ghi")
    logits = llm.prompt_logits(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size) and logits.dtype == torch.float32
    first = llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=1, temperature=0,
                                                                              ignore_eos=True))[0]
    assert first.outputs[0].token_ids[0] == int(logits[-1].argmax())
    # a prefix's logits are the same rows of the longer prompt's
    assert torch.allclose(llm.prompt_logits(ids[:5]), logits[:5], atol=1e-5)


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = llm.generate("seeded", p)[0].outputs[0].token_ids
    b = llm.generate(["other prompt", "seeded"], [SamplingParams(max_tokens=5, seed=9), p])[1].outputs[0].token_ids
    assert a == b
    c = llm.generate("seeded", SamplingParams(max_tokens=16, temperature=1.0, seed=999, ignore_eos=True))[0]
    assert c.outputs[0].token_ids != a


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate("x", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    top1 = llm.generate("x", SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=3, ignore_eos=True))[0]
    assert top1.outputs[0].token_ids == greedy


def test_stop_string_and_stop_token(llm):
    base = llm.generate("stop test", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) > 4
    stop = text[2:4]
    cut = llm.generate("stop test", SamplingParams(max_tokens=20, temperature=0, stop=stop, ignore_eos=True))[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == text[:text.find(stop)]
    tok = base.token_ids[3]
    by_tok = llm.generate("stop test", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tok],
                                                      ignore_eos=True))[0].outputs[0]
    assert by_tok.token_ids == base.token_ids[:base.token_ids.index(tok) + 1] and by_tok.finish_reason == "stop"


def test_eos_stops_unless_ignored(llm):
    assert llm.get_tokenizer().eos_token_ids[0] in llm.engine.eos_token_ids
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    base = llm.generate("eos", p)[0].outputs[0].token_ids
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = {base[3]}  # pretend the 4th greedy token is EOS
    try:
        stopped = llm.generate("eos", SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
        ignored = llm.generate("eos", p)[0].outputs[0]
    finally:
        llm.engine.eos_token_ids = saved
    assert stopped.token_ids == base[:base.index(base[3]) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == base


def test_chat(llm):
    out = llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                   SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 4
    assert out[0].prompt.startswith("<begin_of_document><beginning_of_sentence>system")


def test_stream_equals_generate(llm):
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    assert "".join(llm.stream("streaming", p)) == llm.generate("streaming", p)[0].outputs[0].text


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"), (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]])
    with pytest.raises(ValueError, match="token ids"):
        llm.generate(prompt_token_ids=[1, 2, 10**9])
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate()
    small = LLM("tiny", max_model_len=32)
    with pytest.raises(ValueError, match="context"):
        small.generate(prompt_token_ids=list(range(40)))
    out = small.generate(prompt_token_ids=list(range(20)), sampling_params=SamplingParams(max_tokens=100,
                                                                                          ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12
    # the engine still serves after errors
    assert len(llm.generate("ok", SamplingParams(max_tokens=2))[0].outputs[0].token_ids) <= 2
