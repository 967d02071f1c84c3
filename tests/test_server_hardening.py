"""A server that no request can kill, on the tiny model: every hostile or careless input of issue 14 gets
its 4xx (naming the field) with the server serving afterwards; the HTTP front (Host check, Content-Type,
body limit, Bearer in any case, keep-alive after a 500, connection cap); faults injected into one
request's sampling, detokenising or model step fail that request alone."""
import asyncio
import json
import logging
import socket
import time

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402

from minimax_m1.engine.builder import EngineArgs, build_engine  # noqa: E402
from minimax_m1.server.api import build_app  # noqa: E402
from server_util import TIMEOUT, running, wait_until_idle  # noqa: E402

MAX_MODEL_LEN = 1024
VOCAB = 262  # the tiny tokenizer's
HUGE = "9" * 5000  # digits: more than Python parses by default
NESTED = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def server():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=MAX_MODEL_LEN, max_num_seqs=8, progress=False))
    app = build_app(engine, ["tiny"], max_request_bytes=1 << 20, max_num_seqs_per_request=64)
    with running(app, max_connections=64) as url:
        yield type("S", (), dict(url=url, app=app, engine=engine))


def post(url: str, route: str, raw: bytes | str, headers=None, **kw) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{url}/v1/{route}", content=raw, headers=headers, timeout=TIMEOUT, **kw)


def still_serving(url: str) -> None:
    assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "still here", "max_tokens": 3, "temperature": 0,
                                                 "ignore_eos": True}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


# ---- every input of the issue: (route, raw JSON body, the status, the field the error names) ----------

C, CH = "completions", "chat/completions"
MSG = '"messages": [{"role": "user", "content": "hi"}]'
INPUTS = [
    (C, '{"prompt": "hi", "top_k": 100000000000000000000}', 400, "top_k"),
    (C, f'{{"prompt": "hi", "top_k": {VOCAB + 1}}}', 400, "top_k"),
    (C, '{"prompt": [[false]]}', 400, "prompt"),
    (C, '{"prompt": [true, 1]}', 400, "prompt"),
    (C, '{"prompt": [-1]}', 400, "prompt"),
    (C, '{"prompt": "hi", "stream": "yes"}', 400, "stream"),
    (C, '{"prompt": "hi", "n": "2"}', 400, "n"),
    (C, '{"prompt": "hi", "max_tokens": 2.0}', 400, "max_tokens"),
    (C, f'{{"prompt": "hi", "max_tokens": {HUGE}}}', 400, "max_tokens"),
    (C, f'{{"prompt": "hi", "seed": {HUGE}}}', 400, "seed"),
    (C, f'{{"prompt": "hi", "some_extra_field": [1, {HUGE}]}}', 400, "some_extra_field[1]"),
    (C, '{"prompt": "hi", "seed": 18446744073709551616}', 400, "seed"),
    (C, '{"prompt": "hi", "max_tokens": 100000000000}', 400, "max_tokens"),
    (C, f'{{"prompt": "hi", "max_tokens": {MAX_MODEL_LEN}}}', 400, "max_tokens"),  # over the context
    (C, '{"prompt": "hi", "n": 1000}', 400, "n"),
    (C, '{"prompt": "hi", "logprobs": 100000000000000000000}', 400, "logprobs"),
    (C, '{"prompt": "hi", "best_of": 100000000000000000000}', 400, "best_of"),
    (C, '{"prompt": "hi", "min_tokens": 100000000000000000000}', 400, "min_tokens"),
    (C, f'{{"prompt": "hi", "stop_token_ids": [{VOCAB}]}}', 400, "stop_token_ids"),
    (C, '{"prompt": "hi", "stop_token_ids": [-1]}', 400, "stop_token_ids[0]"),
    (C, '{"prompt": "hi", "stop_token_ids": [100000000000000000000]}', 400, "stop_token_ids[0]"),
    (C, '{"prompt": "hi", "stop": ' + json.dumps(["x"] * 65) + '}', 400, "stop"),
    (C, '{"prompt": [' + ", ".join(['"p"'] * 200) + '], "n": 128, "max_tokens": 1}', 400, "prompt"),
    (C, '{"prompt": [' + ", ".join(['"p"'] * 65) + '], "max_tokens": 1}', 400, "prompt"),  # 65 > 64 per request
    (C, '{"prompt": "\\ud800"}', 400, "prompt"),
    (C, '{"prompt": ["ok", "a\\udfffb"]}', 400, "prompt[1]"),
    (C, '{"prompt": "hi", "\\ud800": 1}', 400, "\\ud800"),  # escaped in the error
    (C, '{"prompt": ' + NESTED + '}', 400, None),
    (C, '{"prompt": "hi", "x": ' + "[" * 70 + "]" * 70 + '}', 400, "x" + "[0]" * 63),
    (C, '{"prompt": "hi", "temperature": NaN}', 400, None),
    (C, '{"prompt": "hi", "temperature": Infinity}', 400, None),
    (C, '{"prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    (C, '["not", "an", "object"]', 400, None),
    (C, '{"prompt": "hi"', 400, None),
    (CH, '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
    (CH, '{' + MSG + ', "max_completion_tokens": 100000000000000000000}', 400, "max_completion_tokens"),
    (CH, '{' + MSG + ', "top_logprobs": 100000000000000000000, "logprobs": true}', 400, "top_logprobs"),
    (CH, '{' + MSG + ', "logprobs": "yes"}', 400, "logprobs"),
    (CH, '{' + MSG + ', "n": 129}', 400, "n"),
    (CH, '{' + MSG + ', "n": 65}', 400, "n"),  # over --max-num-seqs-per-request
    (CH, '{' + MSG + ', "top_k": 100000000000000000000}', 400, "top_k"),
    (CH, '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400, "messages[0].content"),
    (CH, '{"messages": ' + NESTED + '}', 400, None),
    (CH, '{"messages": [{"role": 1, "content": "hi"}]}', 400, "messages[0].role"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_every_bad_input_gets_its_4xx_naming_the_field(server, stream):
    for route, raw, status, param in INPUTS:
        if stream and raw.startswith("{") and raw.endswith("}") and '"stream"' not in raw:
            raw = raw[:-1] + ', "stream": true}'
        r = post(server.url, route, raw)
        assert r.status_code == status, (route, raw[:120], r.text[:300])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
        assert error["param"] == param, (raw[:120], error)
    # null stays accepted for the optional fields
    r = post(server.url, C, '{"prompt": "hi", "max_tokens": 2, "temperature": null, "top_k": null, "seed": null, '
                            '"stop": null, "stop_token_ids": null, "logprobs": null, "user": null}')
    assert r.status_code == 200, r.text
    still_serving(server.url)
    wait_until_idle(server.url)


def test_http_front_refusals(server):
    url = server.url
    ok = '{"prompt": "hi", "max_tokens": 2}'
    # JSON only: a text/plain POST (a web page's, without CORS preflight) never reaches the engine
    for ctype in ["text/plain", "application/x-www-form-urlencoded", ""]:
        r = httpx.post(url + "/v1/completions", content=ok, headers={"Content-Type": ctype}, timeout=TIMEOUT)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
        assert r.headers["connection"] == "close"
    assert post(url, C, ok, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    # body size: 413 from Content-Length before reading, and while reading a chunked body
    big = json.dumps({"prompt": "a" * (1 << 20)})
    r = post(url, C, big)
    assert r.status_code == 413 and r.headers["connection"] == "close", r.text
    assert "max-request-bytes" in r.json()["error"]["message"]
    r = post(url, C, (big[i:i + 65536].encode() for i in range(0, len(big), 65536)))  # chunked
    assert r.status_code == 413, r.text
    assert post(url, C, b'{"prompt": "\xff\xfe"}').status_code == 400  # not UTF-8
    # DNS rebinding: a page of evil.example rebinding its name to 127.0.0.1 sends Host: evil.example
    for host, status in [("evil.example", 400), ("evil.example:8000", 400), ("localhost:1", 200),
                         ("127.0.0.1", 200), ("[::1]:8000", 200), ("LOCALHOST", 200)]:
        r = httpx.get(url + "/v1/models", headers={"Host": host}, timeout=TIMEOUT)
        assert r.status_code == status, (host, r.text)
    assert r.json()["object"] == "list"
    r = httpx.get(url + "/health", headers={"Host": "evil.example"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    # CORS is off: no Access-Control headers for any origin
    r = httpx.options(url + "/v1/completions", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"}, timeout=TIMEOUT)
    assert "access-control-allow-origin" not in r.headers
    still_serving(url)


@pytest.fixture
def logged():
    """Every record logged while the test runs, from any logger (uvicorn's do not reach the root)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for lg in loggers:
        lg.addHandler(handler)
    ours = logging.getLogger("minimax_m1")
    level, ours.level = ours.level, logging.INFO
    yield records
    ours.setLevel(level)
    for lg in loggers:
        lg.removeHandler(handler)


def test_keep_alive_survives_a_500_and_client_leaving_mid_upload(server, logged, monkeypatch):
    """A 500 leaves the connection usable (no silent close); a client that leaves while sending its body is
    logged in one line, without a traceback."""
    serving = server.app.state.serving
    real = serving.check_request
    calls = []

    def broken_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the request checks")
        return real(*a, **kw)

    monkeypatch.setattr(serving, "check_request", broken_once)
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"prompt": "hi", "max_tokens": 2}'
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(request)
        first = _read_response(s)
        s.sendall(request)  # the same connection
        second = _read_response(s)
    assert first.startswith(b"HTTP/1.1 500") and b"a bug in the request checks" in first, first
    assert b"connection: close" not in first.lower()
    assert second.startswith(b"HTTP/1.1 200"), second
    # a client leaving mid-upload
    logged.clear()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(request[:-10])
        time.sleep(0.3)
    time.sleep(0.5)
    assert any("disconnected" in r.getMessage() for r in logged)
    assert not [r for r in logged if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in logged]
    still_serving(server.url)


def _read_response(s: socket.socket) -> bytes:
    """One HTTP response with a Content-Length from the socket (b"" if the server closed it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_api_key_bearer_any_case():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=256, progress=False))
    with running(build_app(engine, ["tiny"], api_key="s3cret")) as url:
        for auth, status in [("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER  s3cret", 200),
                             ("Bearer wrong", 401), ("Basic s3cret", 401), ("s3cret", 401), ("", 401)]:
            r = httpx.get(url + "/v1/models", headers={"Authorization": auth}, timeout=TIMEOUT)
            assert r.status_code == status, (auth, r.text)
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200  # open


def test_connection_cap_refuses_with_503():
    engine = build_engine(EngineArgs(model="tiny", max_model_len=256, progress=False))
    with running(build_app(engine, ["tiny"]), max_connections=4) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=TIMEOUT) for _ in range(4)]
        try:
            time.sleep(0.2)
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as extra:
                extra.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                reply = _read_response(extra)
            assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply, reply
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200


# ---- faults inside the engine ---------------------------------------------------------------------


def _completion(url, **body):
    return httpx.post(url + "/v1/completions", json={"prompt": "fault", "max_tokens": 8, "temperature": 0,
                                                     "ignore_eos": True, **body}, timeout=TIMEOUT)


def test_a_request_failing_in_sampling_fails_alone(server, monkeypatch):
    """The batched sampler raises whenever the poisoned request (seed 4242) is in the batch; the engine
    samples the rows one by one, fails that request and keeps the others' tokens exact."""
    real = server.engine.runner.sample

    def poisoned(logits, seqs):
        if any(s.params.seed == 4242 for s in seqs):
            raise RuntimeError("sampling blew up")
        return real(logits, seqs)

    alone = _completion(server.url, max_tokens=24).json()["choices"][0]["text"]
    monkeypatch.setattr(server.engine.runner, "sample", poisoned)

    async def both():
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            body = {"prompt": "fault", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(
                client.post(server.url + "/v1/completions", json=body),
                client.post(server.url + "/v1/completions", json={**body, "temperature": 1.0, "seed": 4242}),
                client.post(server.url + "/v1/completions", json={**body, "seed": 4242, "stream": True}))

    good, bad, bad_stream = asyncio.run(both())
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "request_failed"
    assert "sampling blew up" in bad.json()["error"]["message"] and "cmpl-" in bad.json()["error"]["message"]
    events = [json.loads(line[6:]) for line in bad_stream.text.splitlines() if line.startswith("data: {")]
    assert bad_stream.status_code == 200 and events[-1]["error"]["code"] == "request_failed"
    assert _completion(server.url, max_tokens=24).json()["choices"][0]["text"] == alone
    wait_until_idle(server.url)
    assert not server.engine.requests


def test_a_request_failing_in_detokenising_fails_alone(server, monkeypatch):
    engine = server.engine
    real = engine._append

    def poisoned(seq, token, logprobs):
        if seq.params.seed == 4343:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        return real(seq, token, logprobs)

    monkeypatch.setattr(engine, "_append", poisoned)
    bad = _completion(server.url, seed=4343)
    assert bad.status_code == 500 and "UnicodeDecodeError" in bad.json()["error"]["message"]
    chunks = list(openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
                  .completions.create(model="tiny", prompt="fault", max_tokens=8, stream=True, temperature=0))
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 1
    still_serving(server.url)
    wait_until_idle(server.url)


def test_a_failing_model_step_is_retried_once_then_fails_its_requests(server, monkeypatch):
    """A step that raises preempts its requests (caches freed, recomputed): a transient failure (an
    out-of-memory) costs a retry and the output is unchanged; one that repeats fails that request only."""
    runner = server.engine.runner
    real = runner.run
    expected = _completion(server.url).json()["choices"][0]["text"]
    state = {"oom_left": 1}

    def flaky(chunks, all_logits=False, **kwargs):  # kwargs: device_ids, from async scheduling (on with CUDA)
        seeds = {c.seq.params.seed for c in chunks}
        if 5151 in seeds and state["oom_left"]:
            state["oom_left"] -= 1
            raise torch.OutOfMemoryError("simulated out of memory")
        if 5252 in seeds:
            raise RuntimeError("this request always breaks the step")
        return real(chunks, all_logits, **kwargs)

    monkeypatch.setattr(runner, "run", flaky)
    preemptions = server.engine.scheduler.num_preemptions
    r = _completion(server.url, seed=5151)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert server.engine.scheduler.num_preemptions == preemptions + 1
    r = _completion(server.url, seed=5252)
    assert r.status_code == 500 and "always breaks the step" in r.json()["error"]["message"]
    assert _completion(server.url).json()["choices"][0]["text"] == expected
    m = wait_until_idle(server.url)
    assert m['minimax_m1_request_finished_total{finished_reason="error"}'] >= 1
    still_serving(server.url)


def test_cors_only_for_allowed_origins_and_host_check_only_on_loopback():
    from minimax_m1.server.args import ServerArgs

    engine = build_engine(EngineArgs(model="tiny", max_model_len=256, progress=False))
    app = build_app(engine, ["tiny"], allowed_origins=["http://app.example"], allowed_hosts=["m1.internal"])
    with running(app) as url:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        r = httpx.options(url + "/v1/completions", headers={"Origin": "http://app.example", **preflight},
                          timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(url + "/v1/completions", headers={"Origin": "http://evil.example", **preflight},
                          timeout=TIMEOUT)
        assert "access-control-allow-origin" not in r.headers
        assert httpx.get(url + "/health", headers={"Host": "m1.internal:8000"}, timeout=TIMEOUT).status_code == 200
    assert ServerArgs(host="0.0.0.0").host_names() is None  # bound to every address: names are not known
    assert "m1" in ServerArgs(host="0.0.0.0", allowed_hosts=["m1"]).host_names()
    assert ServerArgs(allowed_hosts=["*"]).host_names() is None
    assert ServerArgs(host="127.0.0.5").host_names() >= {"localhost", "127.0.0.1", "::1", "127.0.0.5"}
    with pytest.raises(ValueError, match="max-request-bytes"):
        ServerArgs(max_request_bytes=0)


def test_api_key_from_file_or_environment(tmp_path, monkeypatch):
    import argparse

    from minimax_m1.cli import _api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("MINIMAX_M1_API_KEY", "from-env")
    ns = argparse.Namespace
    assert _api_key(ns(api_key=None, api_key_file=None)) == "from-env"
    assert _api_key(ns(api_key=None, api_key_file=str(key_file))) == "from-file"
    assert _api_key(ns(api_key="given", api_key_file=None)) == "given"
    with pytest.raises(ValueError, match="not both"):
        _api_key(ns(api_key="given", api_key_file=str(key_file)))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        _api_key(ns(api_key=None, api_key_file=str(tmp_path / "empty")))
    monkeypatch.delenv("MINIMAX_M1_API_KEY")
    assert _api_key(ns(api_key=None, api_key_file=None)) is None
