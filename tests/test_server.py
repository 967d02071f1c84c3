"""The OpenAI-compatible server on the tiny model, driven through the real `openai` client: completions and
chat (whole and streamed), reasoning_content, 32 concurrent requests, every kind of bad request -> 400 with the
server still serving, client disconnects freeing their requests, the API key."""
import asyncio
import os
import socket
import subprocess
import sys
import time
import types

import pytest

# the server's own dependencies and the test client (the test extra); absent on a bare GPU machine
for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import openai  # noqa: E402

from minimax_m1.engine.builder import EngineArgs, build_engine  # noqa: E402
from minimax_m1.server.api import build_app  # noqa: E402
from minimax_m1.server.async_engine import MAX_FAILED_STEPS  # noqa: E402
from minimax_m1.server.reasoning import ReasoningParser, split_reasoning  # noqa: E402
from minimax_m1.tokenizer import TINY_CHAT_TEMPLATE  # noqa: E402
from server_util import metrics, running, wait_until_idle  # noqa: E402

MAX_MODEL_LEN = 4096
TIMEOUT = 60.0
# the tiny template, plus: a last user message starting with "think:" opens a <think> block in the prompt
THINK_TEMPLATE = TINY_CHAT_TEMPLATE + (
    "{% if add_generation_prompt and messages[-1]['content'][0]['text'].startswith('think:') %}<think>\n{% endif %}")


@pytest.fixture(scope="module")
def server():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=MAX_MODEL_LEN, progress=False))
    engine.tokenizer.chat_template = THINK_TEMPLATE
    app = build_app(engine, ["tiny", "tiny-alias"])
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        yield types.SimpleNamespace(url=url, app=app, engine=engine, client=client)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# ---- endpoints ----------------------------------------------------------------------------------


def test_health_models_version(server):
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    assert httpx.get(server.url + "/version", timeout=TIMEOUT).json()["version"]
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    assert server.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("other")


def test_completion_whole_and_streamed(server):
    c = server.client
    whole = c.completions.create(model="tiny", prompt="Hello, MiniMax", max_tokens=12, **GREEDY)
    (choice,) = whole.choices
    assert whole.object == "text_completion" and whole.model == "tiny" and whole.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.index == 0
    assert whole.usage.prompt_tokens == len("Hello, MiniMax") and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    again = c.completions.create(model="tiny-alias", prompt="Hello, MiniMax", max_tokens=12, **GREEDY)
    assert again.choices[0].text == choice.text and again.model == "tiny"  # greedy: the same text

    chunks = list(c.completions.create(model="tiny", prompt="Hello, MiniMax", max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == choice.text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12  # usage in the last chunk
    assert len({ch.id for ch in chunks}) == 1


def test_completion_prompt_forms_and_n(server):
    c = server.client
    ids = server.engine.tokenizer.encode("abc")
    by_text = c.completions.create(model="tiny", prompt="abc", max_tokens=5, **GREEDY).choices[0].text
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=5, **GREEDY).choices[0].text
    assert by_ids == by_text
    many = c.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=5, n=2, **GREEDY)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text  # greedy copies agree
    assert many.usage.prompt_tokens == 6 and many.usage.completion_tokens == 20
    lists = c.completions.create(model="tiny", prompt=[ids, ids], max_tokens=5, **GREEDY)
    assert [ch.text for ch in lists.choices] == [by_text, by_text]
    sampled = c.completions.create(model="tiny", prompt="abc", max_tokens=16, n=3, temperature=1.0, seed=7,
                                   extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                                               "repetition_penalty": 1.1})
    texts = [ch.text for ch in sampled.choices]
    assert len(set(texts)) > 1  # the copies sample independently
    resampled = c.completions.create(model="tiny", prompt="abc", max_tokens=16, n=3, temperature=1.0, seed=7,
                                     extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                                                 "repetition_penalty": 1.1})
    assert [ch.text for ch in resampled.choices] == texts  # a seed makes them reproducible


def test_completion_stop_and_logprobs(server):
    c = server.client
    base = c.completions.create(model="tiny", prompt="stop here", max_tokens=20, **GREEDY).choices[0].text
    printable = [i for i, ch in enumerate(base) if ch.isalnum()]
    if printable:
        stop = base[printable[0]]
        cut = c.completions.create(model="tiny", prompt="stop here", max_tokens=20, stop=[stop], **GREEDY).choices[0]
        assert cut.finish_reason == "stop" and cut.text == base[:base.index(stop)]
    lp = c.completions.create(model="tiny", prompt="log", max_tokens=4, logprobs=3, **GREEDY).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4  # tokens that read the same share an entry
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the best one
    streamed = list(c.completions.create(model="tiny", prompt="log", max_tokens=4, logprobs=3, stream=True, **GREEDY))
    tokens = [t for ch in streamed if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_chat_whole_and_streamed(server):
    c = server.client
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    (choice,) = whole.choices
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 10
    prompt = server.engine.tokenizer.apply_chat_template(
        [messages[0], {"role": "user", "content": "Hi\nthere"}])  # text parts join with newlines
    assert whole.usage.prompt_tokens == len(server.engine.tokenizer.encode(prompt))
    raw = c.completions.create(model="tiny", prompt=prompt, max_tokens=10, **GREEDY).choices[0].text
    assert (choice.message.reasoning_content, choice.message.content) == split_reasoning(raw, prompt)

    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or ""
                        for ch in chunks if ch.choices)
    assert content == (choice.message.content or "") and reasoning == (choice.message.reasoning_content or "")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    two = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, n=2, stream=True,
                                         stream_options={"include_usage": True}, temperature=1.0,
                                         extra_body={"ignore_eos": True}))
    roles = [ch.choices[0].index for ch in two if ch.choices and ch.choices[0].delta.role == "assistant"]
    ends = sorted(ch.choices[0].index for ch in two if ch.choices and ch.choices[0].finish_reason)
    assert roles == [0, 1] and ends == [0, 1] and two[-1].usage.completion_tokens == 8


def test_chat_reasoning_content(server):
    """A prompt that opens <think>: the answer's text up to </think> is reasoning_content, the rest content;
    streamed the same; and the raw text when the parser is off."""
    c = server.client
    messages = [{"role": "user", "content": "think: why?"}]
    prompt = server.engine.tokenizer.apply_chat_template(messages)
    assert prompt.endswith("<think>\n")
    raw = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, **GREEDY).choices[0].text
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, **GREEDY).choices[0].message
    assert whole.reasoning_content is not None
    if "</think>" in raw:
        assert whole.reasoning_content + "</think>" + (whole.content or "") == raw
    else:
        assert whole.reasoning_content == raw and whole.content is None
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, stream=True, **GREEDY))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == whole.reasoning_content
    assert "".join(d.content or "" for d in deltas) == (whole.content or "")

    serving = server.app.state.serving
    serving.reasoning_parser = False
    try:
        off = c.chat.completions.create(model="tiny", messages=messages, max_tokens=24, **GREEDY).choices[0].message
    finally:
        serving.reasoning_parser = True
    assert off.content == raw and getattr(off, "reasoning_content", None) is None


@pytest.mark.parametrize("text,prompt,want", [
    ("<think>abc</think>\n\nhello", "", ("abc", "\n\nhello")),
    ("  <think>abc</think>hi", "", ("abc", "hi")),
    ("hello <think>x</think>", "", (None, "hello <think>x</think>")),
    ("abc</think>hi", "ai\n<think>\n", ("abc", "hi")),
    ("<think>still thinking", "", ("still thinking", None)),
    ("<thi", "", (None, "<thi")),
    ("", "", (None, "")),
    ("<think>a</thi", "", ("a</thi", None)),
    ("<think></think>", "", ("", None)),
])
def test_reasoning_parser_streams_as_it_splits(text, prompt, want):
    assert split_reasoning(text, prompt) == want
    for cuts in [range(len(text) + 1), [len(text) // 2], [1, 5, 9]]:  # one char at a time, halves, odd cuts
        parser, reasoning, content = ReasoningParser(prompt), "", ""
        for k in [*cuts, len(text)]:
            r, c = parser.feed(text[:k], final=k == len(text))
            reasoning, content = reasoning + r, content + c
        got = (reasoning, content or None) if parser.reasoned else (None, content)
        assert got == want, cuts


def test_chat_logprobs(server):
    c = server.client
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                    logprobs=True, top_logprobs=2, **GREEDY).choices[0]
    assert len(out.logprobs.content) == 3
    for entry in out.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_32_concurrent_requests(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

        async def one(i):
            if i % 2:
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8, stream=True,
                    stream_options={"include_usage": True}, **GREEDY)
                chunks = [ch async for ch in stream]
                return chunks[-1].usage.completion_tokens
            out = await client.completions.create(model="tiny", prompt=f"request {i}", max_tokens=8, **GREEDY)
            return out.usage.completion_tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), TIMEOUT)
        finally:
            await client.close()

    assert asyncio.run(run()) == [8] * 32
    m = wait_until_idle(server.url)
    assert m["minimax_m1_time_to_first_token_seconds_count"] >= 32
    assert m["minimax_m1_generation_tokens_total"] >= 32 * 8
    assert m["minimax_m1_generation_tokens_per_second"] > 0 and m["minimax_m1_num_requests_waiting"] == 0


# ---- bad requests -------------------------------------------------------------------------------

LONG = "a" * (MAX_MODEL_LEN + 10)  # one token per byte
BAD_COMPLETIONS = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"prompt": LONG}, "prompt"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),  # prompt + max_tokens over the context
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"top_k": -2}, "top_k"),
    ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_json"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.01}, "top_p"),
    ({"n": -3}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages"),  # answers no call
]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, stream):
    for route, base, cases in [("completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4}, BAD_COMPLETIONS),
                               ("chat/completions", {"model": "tiny", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]}, BAD_CHATS)]:
        for change, param in cases:
            body = {**base, "stream": stream, **change}
            if "stream_options" in change:
                body["stream"] = False
            r = httpx.post(f"{server.url}/v1/{route}", json=body, timeout=TIMEOUT)
            assert r.status_code == 400, (route, change, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], error
            assert error["param"] == param, (change, error)
    # through the openai client: its BadRequestError, with the server's message
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client.completions.create(model="tiny", prompt="x", temperature=-1, stream=stream)
    with pytest.raises(openai.NotFoundError, match="does not exist"):  # 404, as OpenAI and vLLM answer
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="gpt-4", prompt="x", stream=stream)
    # bodies that are not JSON objects of the right shape
    for content in [b'{"model": "tiny", "prompt": ', b"[1, 2]", b"", b"null", b'{"prompt": "x", "n": "many"}']:
        r = httpx.post(f"{server.url}/v1/completions", content=content, timeout=TIMEOUT,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], (content, r.text)
    assert httpx.get(server.url + "/v1/nope", timeout=TIMEOUT).json()["error"]["message"]
    # still serving
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    out = server.client.completions.create(model="tiny", prompt="still here", max_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3
    wait_until_idle(server.url)


# ---- disconnects --------------------------------------------------------------------------------


def test_streaming_disconnect_frees_the_request(server):
    before = metrics(server.url)
    aborted = 'minimax_m1_request_finished_total{finished_reason="abort"}'
    stream = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "long"}],
                                                   max_tokens=MAX_MODEL_LEN - 100, stream=True, **GREEDY)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    during = metrics(server.url)
    assert during["minimax_m1_num_requests_running"] == 1 and during["minimax_m1_state_pool_usage"] > 0
    stream.close()
    after = wait_until_idle(server.url)
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["minimax_m1_num_requests_waiting"] == 0
    generated = after["minimax_m1_generation_tokens_total"] - before["minimax_m1_generation_tokens_total"]
    assert generated < MAX_MODEL_LEN - 200  # stopped early, not run to its end
    assert not server.engine.requests and not server.engine.has_unfinished()


def test_non_streaming_disconnect_frees_the_request(server):
    before = metrics(server.url)
    aborted = 'minimax_m1_request_finished_total{finished_reason="abort"}'
    body = {"model": "tiny", "prompt": "long", "max_tokens": MAX_MODEL_LEN - 100, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=1.0))
    after = wait_until_idle(server.url)
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert not server.engine.requests


def test_engine_failure_fails_requests_cleanly():
    """A step that raises past the engine's own isolation (a bug): the requests in the engine get a 500 naming
    the error and the engine goes on; MAX_FAILED_STEPS failures in a row declare it dead: 503s, /health 503,
    and the server stops with exit code 1 (for a supervisor to restart it), never half-dead."""
    engine = build_engine(EngineArgs(model="tiny", max_model_len=256, progress=False))

    def broken_step():
        raise RuntimeError("simulated device failure")

    engine.step = broken_step
    app = build_app(engine, ["tiny"])
    with running(app) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
        for i in range(MAX_FAILED_STEPS - 1):
            assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
            r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
            assert r.status_code == 500 and "simulated device failure" in r.json()["error"]["message"], r.text
            assert r.json()["error"]["code"] == "request_failed"
        r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)  # the failure too many
        assert r.status_code == 503 and "simulated device failure" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "engine_dead"
        assert not app.state.engine.accepting  # what /health answers (503) until the server is gone
        srv = app.state.uvicorn_server
        deadline = time.monotonic() + 10
        while srv.started and not srv.should_exit:
            assert time.monotonic() < deadline, "the server did not stop after the engine died"
            time.sleep(0.05)
        assert srv.exit_code == 1


# ---- the command line: serve with an API key ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_enforces_the_api_key():
    port = _free_port()
    cmd = [sys.executable, "-m", "minimax_m1.cli", "serve", "--model", "tiny", "--port", str(port),
           "--api-key", "s3cret", "--served-model-name", "m1", "--max-model-len", "512"]
    env = {k: v for k, v in os.environ.items() if k != "MINIMAX_M1_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/metrics", timeout=TIMEOUT).status_code == 200  # open without the key
        for key in ["wrong", ""]:
            client = openai.OpenAI(base_url=url + "/v1", api_key=key or "x", timeout=TIMEOUT, max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model="m1", prompt="x", max_tokens=2)
        r = httpx.post(url + "/v1/completions", json={"model": "m1", "prompt": "x"}, timeout=TIMEOUT)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["m1"]
        out = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             **GREEDY)
        assert out.usage.completion_tokens == 3 and out.model == "m1"
    finally:
        proc.terminate()
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert f"http://127.0.0.1:{port}" in output  # the default bind address is loopback
    assert "Traceback" not in output, output
