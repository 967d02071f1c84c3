"""What agents and eval harnesses use, on the tiny model through the real openai client: tool calls (forced by
tool_choice, the random model never calls one by itself; auto mode read from an output that a regex forces),
streamed and whole; structured outputs (response_format, beta parse with pydantic, guided_*), with 400s that
say what is unsupported; scoring (echo + max_tokens=0 + logprobs against LLM.prompt_logits); /tokenize; nulls;
the usage chunk only when asked for."""
import json
import types

import pytest

for _name in ("fastapi", "uvicorn", "httpx", "openai", "pydantic"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import openai  # noqa: E402
import pydantic  # noqa: E402

from minimax_m1.engine.builder import EngineArgs, build_engine  # noqa: E402
from minimax_m1.server.api import build_app  # noqa: E402
from server_util import running, wait_until_idle  # noqa: E402

TIMEOUT = 60.0
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=4096, progress=False))
    app = build_app(engine, ["tiny"])
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        yield types.SimpleNamespace(url=url, engine=engine, client=client)


def _check_weather_args(arguments: str):
    args = json.loads(arguments)
    assert set(args) == {"city", "unit", "days"} and len(args["city"]) <= 8
    assert args["unit"] in ("c", "f") and 1 <= args["days"] <= 7


# ---- tools ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_whole_and_streamed(server, choice):
    c = server.client
    whole = c.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                      max_tokens=300, seed=1, temperature=1.0)
    (ch,) = whole.choices
    calls = ch.message.tool_calls
    assert calls, ch
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            _check_weather_args(call.function.arguments)
        else:
            assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    named = isinstance(choice, dict)
    assert ch.finish_reason == ("stop" if named else "tool_calls")  # OpenAI's: a named choice says "stop"
    assert ch.message.content is None
    if named:
        assert [call.function.name for call in calls] == ["get_weather"]

    stream = c.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       max_tokens=300, seed=1, temperature=1.0, stream=True)
    got, finishes, content = {}, [], ""
    for chunk in stream:
        assert chunk.choices  # no usage-only chunk: not asked for
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.index not in got:  # the first delta of a call: id, type and the name, before any arguments
                assert d.id and d.type == "function" and d.function.name and not d.function.arguments
                got[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                got[d.index]["arguments"] += d.function.arguments
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert finishes == [ch.finish_reason] and not content
    assert [(g["name"], g["arguments"]) for g in got.values()] == [(x.function.name, x.function.arguments)
                                                                    for x in calls]  # seeded: the same calls


def test_required_without_parallel_calls_makes_one(server):
    for seed in range(4):
        out = server.client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                    tool_choice="required", parallel_tool_calls=False,
                                                    max_tokens=300, seed=seed, temperature=1.0)
        assert len(out.choices[0].message.tool_calls) == 1 and out.choices[0].finish_reason == "tool_calls"


def test_auto_tool_calls_are_parsed(server):
    """tool_choice auto: a call the model writes is parsed (a regex makes the tiny model write one)."""
    written = 'Let me check.\n<tool_calls>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_calls>'
    regex = written.replace(".", r"\.").replace("{", r"\{").replace("}", r"\}")
    out = server.client.chat.completions.create(model="tiny", messages=ASK, tools=[TIME], max_tokens=200,
                                                temperature=0, extra_body={"guided_regex": regex})
    (ch,) = out.choices
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls] == \
        [("get_time", {"zone": "utc"})]
    # tool_choice none: the same text is content
    out = server.client.chat.completions.create(model="tiny", messages=ASK, tools=[TIME], tool_choice="none",
                                                max_tokens=200, temperature=0, extra_body={"guided_regex": regex})
    assert out.choices[0].message.content == written and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


def test_tool_round_trip_renders_through_the_template(server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": [WEATHER]}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    text = server.engine.tokenizer.decode(r.json()["tokens"], skip_special_tokens=False)
    assert '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "days": 1}}\n' \
           '</tool_calls>' in text
    assert "tool name: get_weather\ntool result: 22C" in text and '<tools>\n{"name": "get_weather"' in text
    out = server.client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=3,
                                                **GREEDY)
    assert out.usage.prompt_tokens == r.json()["count"]


# ---- structured outputs -----------------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    unit: str = pydantic.Field(pattern="^(c|f)$")
    days: int = pydantic.Field(ge=1, le=7)
    sunny: bool


def _short_thoughts(server) -> dict:
    """With the reasoning parser on, the output may open with <think> (the schema holds from </think> on); the
    random tiny model would think for hundreds of tokens: a bias on </think> ends a thought at once (the grammar
    masks it everywhere else, whatever the bias)."""
    return {str(server.engine.tokenizer.token_to_id("</think>")): 100}


def test_beta_parse_with_pydantic(server):
    thoughts = 0
    for seed in range(6):
        out = server.client.beta.chat.completions.parse(model="tiny", messages=ASK, response_format=Weather,
                                                        max_tokens=600, seed=seed, temperature=1.0,
                                                        logit_bias=_short_thoughts(server))
        message = out.choices[0].message
        assert isinstance(message.parsed, Weather) and 1 <= message.parsed.days <= 7, message.content
        thoughts += getattr(message, "reasoning_content", None) is not None
    assert thoughts > 0  # outputs that opened with <think>: the schema held after it


def test_response_format_and_guided_fields(server):
    c = server.client
    out = c.chat.completions.create(model="tiny", messages=ASK, max_tokens=1000, seed=3, temperature=1.0,
                                    response_format={"type": "json_object"}, logit_bias=_short_thoughts(server))
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    for extra, check in [
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
        ({"guided_json": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
         lambda t: isinstance(json.loads(t), list)),
        ({"structured_outputs": {"choice": ["red", "blue"]}}, lambda t: t in ("red", "blue")),
    ]:
        text = c.completions.create(model="tiny", prompt="Answer:", max_tokens=100, seed=5, temperature=1.0,
                                    extra_body=extra).choices[0].text
        assert check(text), (extra, text)


@pytest.mark.parametrize("body,param,match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}},
     "response_format", "not supported"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"guided_grammar": "start: nope_rule"}, "guided_grammar", "grammar"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs", "exactly one"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
])
def test_unsupported_constraints_are_400s_that_say_what(server, body, param, match):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"model": "tiny", "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and match in r.json()["error"]["message"], r.text


# ---- scoring ----------------------------------------------------------------------------------------


def test_echo_max_tokens_0_logprobs_equal_prompt_logits(server):
    prompt = "The capital of France is Paris."
    ids = server.engine.tokenizer.encode(prompt)
    out = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    (ch,) = out.choices
    assert ch.text == prompt and ch.finish_reason == "length" and out.usage.completion_tokens == 0
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = server.engine.prompt_logits(ids).log_softmax(-1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-5, i
        assert len(lp.top_logprobs[i]) in (2, 3)  # the top 2, and the prompt token itself
        best = ref[i - 1].max().item()
        assert max(lp.top_logprobs[i].values()) == pytest.approx(best, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    # echo with a completion: the prompt's entries, then the completion's; and streamed the same
    whole = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=0,
                                             **GREEDY).choices[0]
    assert whole.text.startswith(prompt) and len(whole.logprobs.tokens) == len(ids) + 4
    assert whole.logprobs.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    chunks = list(server.client.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True,
                                                   logprobs=0, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == whole.logprobs.tokens
    # vLLM's prompt_logprobs field
    r = httpx.post(server.url + "/v1/completions", timeout=TIMEOUT,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 1})
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for i in range(1, len(ids)):
        e = entries[i][str(ids[i])]
        assert abs(e["logprob"] - ref[i - 1, ids[i]].item()) < 1e-5
        assert e["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
    wait_until_idle(server.url)


def test_sampling_fields(server):
    c = server.client
    # min_tokens holds back the end; logit_bias forces a token; bad_words keeps one out
    tok = server.engine.tokenizer
    x = tok.encode("x")[0]
    out = c.completions.create(model="tiny", prompt="hi", max_tokens=5, temperature=0,
                               logit_bias={str(x): 100}).choices[0]
    assert out.text == "xxxxx"
    out = c.completions.create(model="tiny", prompt="hi", max_tokens=5, temperature=0, logit_bias={str(x): 100},
                               extra_body={"bad_words": ["xxx"]}).choices[0]
    assert "xxx" not in out.text and out.text.startswith("xx")
    eos = tok.eos_token_ids[0]
    out = c.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0, logit_bias={str(eos): 100},
                               extra_body={"min_tokens": 4})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 5  # 4, then EOS
    stop_id = tok.encode("y")[0]
    out = c.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0,
                               logit_bias={str(stop_id): 100}, extra_body={"stop_token_ids": [stop_id]}).choices[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # best_of: the n most likely of best_of samples
    out = c.completions.create(model="tiny", prompt="hi", max_tokens=4, n=2, best_of=4, seed=0, logprobs=0,
                               extra_body={"ignore_eos": True})
    sums = [sum(ch.logprobs.token_logprobs) for ch in out.choices]
    assert len(out.choices) == 2 and sums[0] >= sums[1] and [ch.index for ch in out.choices] == [0, 1]
    wait_until_idle(server.url)


def test_nulls_are_defaults_and_usage_only_when_asked(server):
    nulls = {k: None for k in ("n", "stream", "logprobs", "echo", "ignore_eos", "skip_special_tokens", "min_tokens",
                               "temperature", "top_p", "stop", "seed", "logit_bias", "stream_options", "best_of",
                               "suffix", "user", "top_k", "bad_words", "prompt_logprobs", "response_format")}
    r = httpx.post(server.url + "/v1/completions", timeout=TIMEOUT,
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    chat_nulls = {k: None for k in ("n", "stream", "logprobs", "top_logprobs", "add_generation_prompt", "tools",
                                    "tool_choice", "max_tokens", "min_tokens", "response_format")}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                   json={"model": None, "messages": [{"role": "user", "content": "hi", "name": None}],
                         "max_completion_tokens": 2, **chat_nulls})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT, json={"model": "tiny", "messages": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    # the common client loop reads chunk.choices[0]: no usage-only chunk unless asked for
    for body in ({"prompt": "hi"}, {"messages": ASK}):
        route = "completions" if "prompt" in body else "chat/completions"
        plain = _events(server.url, route, {**body, "max_tokens": 3, "stream": True})
        assert plain and all(e["choices"] for e in plain)
        asked = _events(server.url, route, {**body, "max_tokens": 3, "stream": True, "ignore_eos": True,
                                            "stream_options": {"include_usage": True}})  # 3 tokens, EOS or not
        assert not asked[-1]["choices"] and asked[-1]["usage"]["completion_tokens"] == 3
        assert all(e["choices"] for e in asked[:-1])


def _events(url, route, body):
    with httpx.stream("POST", f"{url}/v1/{route}", json={"model": "tiny", **body}, timeout=TIMEOUT) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_tokenize_detokenize_and_unknown_model(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello", "return_token_strs": True}, timeout=TIMEOUT)
    body = r.json()
    assert body["tokens"] == server.engine.tokenizer.encode("Hello") and body["count"] == 5
    assert body["max_model_len"] == 4096 and "".join(body["token_strs"]) == "Hello"
    r = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=TIMEOUT)
    assert r.json() == {"prompt": "Hello"}
    r = httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 6]}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = httpx.post(server.url + "/tokenize", json={"prompt": "x", "model": "nope"}, timeout=TIMEOUT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x", max_tokens=1)
