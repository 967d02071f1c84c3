"""Limits and fairness on the tiny model: the per-request time limit, round-robin admission (a small
request beside one of 128 sequences), the token budget shared between prompts, tokenisation off the event
loop, and 200 slow connections that do not slow a normal request."""
import asyncio
import socket
import threading
import time

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_name)

import httpx  # noqa: E402

from minimax_m1 import SamplingParams  # noqa: E402
from minimax_m1.engine.builder import EngineArgs, build_engine  # noqa: E402
from minimax_m1.server.api import build_app  # noqa: E402
from minimax_m1.tokenizer import tiny_tokenizer  # noqa: E402
from server_util import TIMEOUT, running, wait_until_idle  # noqa: E402


def _engine(**kw):
    return build_engine(EngineArgs(model="tiny", progress=False, **kw))


def test_max_request_seconds_ends_generation_visibly():
    """Chat without max_tokens may run to the context's end (as vLLM); the time limit ends it with
    finish_reason "length" and stop_reason "max_request_seconds", whole or streamed."""
    with running(build_app(_engine(max_model_len=1 << 16), ["tiny"], max_request_seconds=1.0)) as url:
        body = {"messages": [{"role": "user", "content": "go on forever"}], "ignore_eos": True}
        start = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
        took = time.monotonic() - start
        choice = r.json()["choices"][0]
        assert r.status_code == 200 and choice["finish_reason"] == "length", r.text
        assert choice["stop_reason"] == "max_request_seconds" and r.json()["usage"]["completion_tokens"] > 0
        assert 1.0 <= took < 3.0
        start = time.monotonic()
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT) as s:
            text = "".join(s.iter_text())
        assert time.monotonic() - start < 3.0
        assert '"finish_reason":"length","stop_reason":"max_request_seconds"' in text and text.endswith("[DONE]\n\n")
        wait_until_idle(url)


def test_round_robin_admission_serves_a_small_request_beside_a_huge_one():
    """8 prompts x n=8 (64 sequences through 4 slots) first, then one small request: the small one is
    admitted at the next free slot instead of after all 64."""
    with running(build_app(_engine(max_model_len=512, max_num_seqs=4), ["tiny"])) as url:
        async def run():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                big = asyncio.ensure_future(client.post(url + "/v1/completions", json={
                    "prompt": [f"big {i}" for i in range(8)], "n": 8, "max_tokens": 16, "ignore_eos": True}))
                await asyncio.sleep(0.3)
                start = time.monotonic()
                small = await client.post(url + "/v1/completions", json={"prompt": "small", "max_tokens": 4,
                                                                         "ignore_eos": True})
                small_took = time.monotonic() - start
                big_done = big.done()
                big = await big
                return small, small_took, big_done, big, time.monotonic() - start

        small, small_took, big_done, big, total = asyncio.run(run())
        assert small.status_code == 200 and big.status_code == 200 and len(big.json()["choices"]) == 64
        assert not big_done and small_took < total / 4, (small_took, total)
        wait_until_idle(url)


def test_prompts_share_the_token_budget():
    """A long prompt admitted first does not hold the whole step budget: a short prompt that arrives while
    it is still prefilling gets its first token in the next step, and both outputs match their runs alone."""
    engine = _engine(max_num_batched_tokens=512)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    long_prompt, short_prompt = [i % 256 for i in range(1200)], [7, 8, 9]
    alone = {}
    for rid, prompt in [("long", long_prompt), ("short", short_prompt)]:
        engine.add_request(rid, prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    alone[rid] = out.outputs[0].token_ids
    engine.add_request("long", long_prompt, params)
    engine.step()
    engine.add_request("short", short_prompt, params)
    first_token, together, step = {}, {}, 1
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            first_token.setdefault(out.request_id, step)
            if out.finished:
                together[out.request_id] = out.outputs[0].token_ids
    assert first_token["short"] == 2 and first_token["long"] == 3  # 512 + 509 + 179 prompt tokens
    assert together == alone


def test_long_prompt_tokenises_off_the_event_loop():
    """A prompt of 2 MB takes seconds to tokenise (then is refused as too long for the context): /health
    keeps answering meanwhile."""
    with running(build_app(_engine(max_model_len=1024), ["tiny"], max_request_bytes=4 << 20)) as url:
        async def run():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                long = asyncio.ensure_future(client.post(url + "/v1/completions", json={"prompt": "ab " * 700_000}))
                latencies = []
                while not long.done():
                    start = time.monotonic()
                    assert (await client.get(url + "/health")).status_code == 200
                    latencies.append(time.monotonic() - start)
                    await asyncio.sleep(0.05)
                return await long, latencies

        r, latencies = asyncio.run(run())
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert len(latencies) > 10 and max(latencies) < 0.5, latencies


def test_tokenizer_long_text_path_is_the_same():
    tok = tiny_tokenizer()
    text = "héllo wörld <think> " * 400  # past the length where encode goes through encode_batch
    assert tok.encode(text) == tok._tok.encode(text, add_special_tokens=False).ids


def test_200_slow_connections_do_not_delay_a_normal_request():
    """200 clients dribbling their headers a byte at a time: a normal request is not slower by 1 s, and the
    header deadline closes the dribblers (408)."""
    with running(build_app(_engine(max_model_len=512), ["tiny"]), timeout_header=3.0) as url:
        host, port = url.removeprefix("http://").split(":")
        body = {"prompt": "normal", "max_tokens": 8, "ignore_eos": True}

        def timed() -> float:
            start = time.monotonic()
            assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
            return time.monotonic() - start

        timed()
        baseline = min(timed() for _ in range(3))
        slow = [socket.create_connection((host, int(port)), timeout=TIMEOUT) for _ in range(200)]
        stop = threading.Event()

        def dribble():
            text = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nX-Slow: " + "a" * 100
            for i in range(len(text)):
                for s in slow:
                    try:
                        s.send(text[i].encode())
                    except OSError:
                        pass
                if stop.wait(0.2):
                    return

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        try:
            time.sleep(0.5)
            during = max(timed() for _ in range(3))
            assert during - baseline < 1.0, (baseline, during)
            time.sleep(3.0)  # past the header deadline
            closed = 0
            for s in slow:
                s.settimeout(2.0)
                try:
                    reply = s.recv(4096)
                    closed += reply == b"" or reply.startswith(b"HTTP/1.1 408")
                except OSError:
                    closed += 1
            assert closed == 200
        finally:
            stop.set()
            thread.join(10)
            for s in slow:
                s.close()
        assert timed() - baseline < 1.0


def test_a_body_slower_than_the_body_timeout_gets_408():
    """The body deadline, and the header deadline for the next request on a keep-alive connection."""
    with running(build_app(_engine(max_model_len=256), ["tiny"]), timeout_body=1.0, timeout_header=1.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 100\r\n\r\n{{\"prompt\": ".encode())
            start = time.monotonic()
            reply = s.recv(4096)
            took = time.monotonic() - start
            assert reply.startswith(b"HTTP/1.1 408") and 0.8 < took < 3.0, (reply, took)
            s.settimeout(5)
            assert s.recv(4096) == b""  # and closed
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            for piece in [b"GET /hea", b"lth HTTP/1.1\r\n", b"Host: x"]:  # trickled, never finished
                s.sendall(piece)
                time.sleep(0.4)
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3.0, reply
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
