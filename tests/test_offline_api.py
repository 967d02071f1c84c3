"""The offline API's vLLM surface on the tiny model: prompt forms, n and best_of, Logprob objects and
cumulative_logprob (checked against prompt_logits), prompt_logprobs, the progress bar, chat options, a
borrowed tokenizer, and the SamplingParams fields the engine does not apply yet."""
import json

import pytest

from minimax_m1 import LLM, SamplingParams
from minimax_m1.outputs import Logprob, to_logprobs
from minimax_m1.tokenizer import tiny_tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny")


def test_prompt_forms(llm):
    ids = llm.get_tokenizer().encode("hi there")
    want = llm.generate("hi there", GREEDY)[0].outputs[0].token_ids
    forms = ["hi there", ids, {"prompt": "hi there"}, {"prompt_token_ids": ids},
             {"prompt_token_ids": ids, "prompt": "hi there"}]
    outs = llm.generate(forms, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [want] * len(forms)
    assert [o.prompt for o in outs] == ["hi there", None, "hi there", None, "hi there"]
    one = llm.generate({"prompt": "hi there"}, GREEDY)  # a dict is one prompt, never iterated
    assert len(one) == 1 and one[0].prompt == "hi there" and one[0].outputs[0].token_ids == want
    assert len(llm.generate(ids, GREEDY)) == 1  # a list of ints is one prompt
    assert llm.generate([], GREEDY) == []


@pytest.mark.parametrize("prompts,match", [
    ({"text": "x"}, "unsupported key.*'text'"), ({}, "'prompt'"), ([{"prompt": 3}], "'prompt'"),
    ([1.5], r"prompts\[0\]"), ({"prompt_token_ids": ["a"]}, "token ids"), (3, "prompts must be"),
    ([[1, True]], "token ids"),
])
def test_bad_prompts(llm, prompts, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, GREEDY)


def test_n_answers_are_the_seeded_copies(llm):
    p = SamplingParams(max_tokens=8, seed=11, n=3, ignore_eos=True)
    out = llm.generate("n test", p)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2] and len({tuple(o.token_ids) for o in out.outputs}) == 3
    for i, o in enumerate(out.outputs):
        alone = llm.generate("n test", SamplingParams(max_tokens=8, seed=11 + i, ignore_eos=True))[0]
        assert alone.outputs[0].token_ids == o.token_ids
    assert [o.outputs[0].token_ids for o in [llm.generate("n test", p)[0]]] == [out.outputs[0].token_ids]


def test_best_of_keeps_the_most_likely(llm):
    p = SamplingParams(max_tokens=8, seed=5, n=2, best_of=5, ignore_eos=True)
    out = llm.generate("best of", p)[0]
    every = llm.generate("best of", SamplingParams(max_tokens=8, seed=5, n=5, logprobs=0, ignore_eos=True))[0]
    ranked = sorted(every.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ranked]
    assert [o.index for o in out.outputs] == [0, 1] and out.outputs[0].logprobs is None
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob


def test_logprob_objects_match_prompt_logits(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("logprobs please")
    o = llm.generate(ids, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(o.logprobs) == 5
    total = 0.0
    for j, (token, entry) in enumerate(zip(o.token_ids, o.logprobs)):
        ref = llm.prompt_logits(ids + o.token_ids[:j])[-1].log_softmax(-1)
        top = ref.topk(3)
        assert list(entry) == top.indices.tolist()  # greedy: the sampled token is the top one
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert isinstance(entry[t], Logprob) and entry[t].rank == rank
            assert abs(entry[t].logprob - v) < 1e-5 and entry[t].decoded_token == tok.decode([t], False)
        total += entry[token].logprob
    assert abs(o.cumulative_logprob - total) < 1e-9
    assert llm.generate(ids, GREEDY)[0].outputs[0].cumulative_logprob is None  # not computed unless asked


def test_to_logprobs_ranks():
    # top 2 plus a sampled token outside them: its rank is unknown
    entries = [{5: -0.1, 7: -2.0, 9: -5.0}, {4: -0.3, 2: -1.0}]
    out = to_logprobs(entries, [9, 2], 2, decode=str)
    assert out[0] == {5: Logprob(-0.1, 1, "5"), 7: Logprob(-2.0, 2, "7"), 9: Logprob(-5.0, None, "9")}
    assert out[1] == {4: Logprob(-0.3, 1, "4"), 2: Logprob(-1.0, 2, "2")}


def test_prompt_logprobs(llm):
    ids = llm.get_tokenizer().encode("score this prompt")
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    ref = llm.prompt_logits(ids).log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        entry, row = out.prompt_logprobs[i], ref[i - 1]
        assert abs(entry[ids[i]].logprob - row[ids[i]].item()) < 1e-6
        assert entry[ids[i]].rank == int((row > row[ids[i]]).sum()) + 1
        top = row.topk(2)
        for rank, t in enumerate(top.indices.tolist(), 1):
            assert entry[t].rank == rank
    assert llm.generate("x", GREEDY)[0].prompt_logprobs is None


def test_progress_bar(llm, capsys):
    llm.generate(["a", "b"], GREEDY)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate("a", GREEDY)
    llm.generate(["a", "b"], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
    llm.generate("a", GREEDY, use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_chat_options(llm):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]
    out = llm.chat(conv, GREEDY, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("ai name=assistant\nHello, I")
    out = llm.chat(conv[:1], GREEDY, chat_template="<{{ who }}>{{ messages[0]['content'][0]['text'] }}",
                   chat_template_kwargs={"who": "me"})[0]
    assert out.prompt == "<me>hi"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert '<tools>\n{"name": "f"' in llm.chat(conv[:1], GREEDY, tools=tools)[0].prompt
    two = llm.chat([conv[:1], conv[:1]], GREEDY, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == two[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        llm.chat([{"role": "robot", "content": "x"}], GREEDY)


def test_borrowed_tokenizer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    cfg = {"architectures": ["MiniMaxM1ForCausalLM"], "vocab_size": 262, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 16,
           "num_local_experts": 4, "num_experts_per_tok": 2, "attn_type_list": [0, 1], "rotary_dim": 8}
    (model / "config.json").write_text(json.dumps(cfg))
    bare = LLM(str(model), device="cpu", load_format="dummy")
    with pytest.raises(ValueError, match="tokenizer=FOLDER"):
        bare.generate("hi")
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tiny_tokenizer().save(tok_dir)
    borrowed = LLM(str(model), tokenizer=str(tok_dir), device="cpu", load_format="dummy")
    out = borrowed.generate("hi", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == tiny_tokenizer().encode("hi") and isinstance(out.outputs[0].text, str)
    assert borrowed.engine.eos_token_ids >= set(tiny_tokenizer().eos_token_ids)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        LLM(str(model), tokenizer=str(tmp_path), device="cpu", load_format="dummy")


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must"), (dict(n=3, best_of=2), "best_of"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "exceed"), (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(logit_bias={"x": 1}), "token ids"), (dict(logit_bias={1: 101}), r"\[-100, 100\]"),
    (dict(bad_words=[""]), "bad_words"), (dict(structured_outputs={"regex": "a", "json": {}}), "exactly one"),
    (dict(max_tokens=-1), "max_tokens"), (dict(structured_outputs={"regex": "a", "nope": 1}), "nope"),
])
def test_sampling_params_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_choices():
    p = SamplingParams(seed=3, n=2, logit_bias={}, bad_words=[])
    assert p.num_samples == 2 and SamplingParams(n=2, best_of=4).num_samples == 4
    assert p.for_choice(1).seed == 4 and p.for_choice(1).n == 1 and SamplingParams(n=2).for_choice(1).seed is None
