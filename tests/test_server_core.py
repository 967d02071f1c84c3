"""`minimax-m1 serve --model tiny` with its engine core in a process of its own: a bounded soak (1000 requests,
64 at a time, streamed and not) with zero errors and everything freed afterwards; outputs identical to the
in-process engine's; the core dying ends the server (503s meanwhile) within 10 s, and the server dying takes
the core with it; the channel carries SamplingParams whole."""
import asyncio
import json
import os
import pathlib
import random
import re
import signal
import sys
import threading
import time

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx", "zmq", "msgspec"):
    pytest.importorskip(_name)

import httpx  # noqa: E402

from minimax_m1 import LLM, SamplingParams  # noqa: E402
from minimax_m1.engine import messages  # noqa: E402
from server_util import ServeProcess, metrics, wait_until_idle  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_server import request_body, run_clients, run_load  # noqa: E402

MAX_MODEL_LEN = 512


def _core_pid(srv: ServeProcess) -> int:
    """The engine core's pid, from the server's log line."""
    deadline = time.monotonic() + 30
    while True:
        found = re.search(r"engine core ready \(pid (\d+)\)", srv.output())
        if found:
            return int(found.group(1))
        assert time.monotonic() < deadline, srv.output()
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def test_soak_1000_requests_64_concurrent_zero_errors(tmp_path):
    rng = random.Random(0)
    bodies = [request_body([rng.randrange(256) for _ in range(rng.randint(1, 24))], rng.randint(1, 6), i % 2 == 0)
              for i in range(1000)]
    with ServeProcess("--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        results, seconds = asyncio.run(asyncio.wait_for(run_load(srv.url, bodies, 64, timeout=60), 300))
        failed = [r.error for r in results if not r.ok]
        assert not failed, (len(failed), failed[:5])
        assert [r.tokens for r in results] == [b["max_tokens"] for b in bodies]  # ignore_eos: all of them
        m = wait_until_idle(srv.url)
        assert m["minimax_m1_num_requests_running"] == 0 and m["minimax_m1_num_requests_waiting"] == 0
        assert m["minimax_m1_state_pool_usage"] == 0 and m["minimax_m1_kv_cache_usage"] == 0
        assert m['minimax_m1_request_finished_total{finished_reason="length"}'] == 1000
        assert m["minimax_m1_generation_tokens_total"] == sum(b["max_tokens"] for b in bodies)
        output = srv.output()
    assert "Traceback" not in output and "WARNING" not in output, output[-3000:]


def test_load_from_several_client_processes(tmp_path):
    """The benchmark's multi-process client (bench_server.run_clients): every request answered, in order, by
    2 processes sharing 8 streams."""
    bodies = [request_body([i % 256, 7], 2 + i % 3, i % 2 == 0) for i in range(24)]
    with ServeProcess("--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        results, seconds, client_cpu = run_clients(srv.url, bodies, 8, 2, timeout=60)
    assert [r.ok for r in results] == [True] * 24, [r.error for r in results if not r.ok][:3]
    assert [r.tokens for r in results] == [b["max_tokens"] for b in bodies] and seconds > 0 and client_cpu > 0


# requests whose outputs the server must give exactly as LLM.generate does: greedy, seeded sampling (the
# request's own generator), stop strings (checked by the server, the core aborted), stop tokens, n copies
CASES = [
    ({"prompt": "hello", "max_tokens": 24, "temperature": 0, "ignore_eos": True}, {}),
    ({"prompt": "seeded", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 7}, {}),
    ({"prompt": "stops", "max_tokens": 40, "temperature": 1.0, "seed": 3, "stop": ["e", "a"]}, {}),
    ({"prompt": "stops kept", "max_tokens": 40, "temperature": 1.0, "seed": 5, "stop": ["o"],
      "include_stop_str_in_output": True}, {}),
    ({"prompt": "stop ids", "max_tokens": 30, "temperature": 1.0, "seed": 11, "stop_token_ids": [101, 102, 103]}, {}),
    ({"prompt": [1, 2, 3, 4], "max_tokens": 16, "temperature": 0.7, "top_k": 20, "seed": 1, "n": 2}, {}),
]


def _offline(body: dict) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice from LLM.generate, with the server's seeds (seed + i per copy)."""
    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
            "include_stop_str_in_output")
    fields = {k: body[k] for k in keys if k in body}
    out = []
    for i in range(body.get("n", 1)):
        p = dict(fields)
        if "seed" in p:
            p["seed"] += i
        prompt = body["prompt"]
        got = _LLM.generate(prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt},
                            SamplingParams(**p), use_tqdm=False)[0].outputs[0]
        out.append((got.text, got.finish_reason))
    return out


_LLM = None


@pytest.mark.parametrize("flags", [[], ["--async-scheduling"]], ids=["sync", "async-scheduling"])
def test_outputs_identical_to_the_in_process_engine(tmp_path, flags):
    """Also with --async-scheduling (engine/async_decode.py): stop strings abort requests with a step in flight."""
    global _LLM
    _LLM = LLM("tiny", device="cpu", max_model_len=MAX_MODEL_LEN, progress=False)
    want = [_offline(body) for body, _ in CASES]
    assert any(reason == "stop" for w in want for _, reason in w)  # the stop cases do stop
    with ServeProcess("--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), *flags,
                      log_path=tmp_path / "log") as srv:
        srv.wait_healthy()

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(body, stream):
                    r = await client.post(srv.url + "/v1/completions", json={**body, "stream": stream})
                    assert r.status_code == 200, r.text
                    if not stream:
                        return [(c["text"], c["finish_reason"]) for c in r.json()["choices"]]
                    texts, reasons = {}, {}
                    for line in r.text.split("\n"):  # not splitlines: the text may hold U+2028 and the like
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:])["choices"]:
                                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                                reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
                    return [(texts[i], reasons[i]) for i in sorted(texts)]

                # all at once, twice (whole and streamed): each batch mixes them
                return await asyncio.gather(*(one(b, s) for s in (False, True) for b, _ in CASES))

        got = asyncio.run(run())
        wait_until_idle(srv.url)
    assert got == want + want


def test_killing_the_core_ends_the_server_within_10s(tmp_path):
    with ServeProcess("--device", "cpu", "--max-model-len", "65536", log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        core = _core_pid(srv)
        result = []

        def stream():
            body = {"prompt": "x", "max_tokens": 60000, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
                    result.append("".join(r.iter_text()))
            except httpx.TransportError as e:
                result.append(e)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        time.sleep(1.0)
        start = time.monotonic()
        os.kill(core, signal.SIGKILL)
        statuses = set()
        while srv.proc.poll() is None and time.monotonic() - start < 10:
            try:
                status = httpx.get(srv.url + "/health", timeout=2).status_code
            except httpx.TransportError:
                status = "refused"
            if time.monotonic() - start > 1.0:  # the server looks at the core every 0.2 s
                statuses.add(status)
            time.sleep(0.05)
        code = srv.proc.wait(max(0.1, 10 - (time.monotonic() - start)))
        took = time.monotonic() - start
        t.join(10)
        output = srv.output()
    assert code == 1 and took < 10, (code, took, output[-2000:])
    assert statuses <= {503, "refused"}, statuses  # never healthy once the core is gone
    assert result and not t.is_alive(), "the stream hung"
    if isinstance(result[0], str):  # it got its end: an error event, not a silent cut
        assert '"code":"engine_dead"' in result[0] and result[0].endswith("data: [DONE]\n\n"), result[0][-300:]


def test_the_core_dies_with_the_server(tmp_path):
    with ServeProcess("--device", "cpu", log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        core = _core_pid(srv)
        srv.proc.send_signal(signal.SIGKILL)  # the server alone, not its group: no chance to clean up
        srv.proc.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(core):
            assert time.monotonic() < deadline, "the engine core outlived the server"
            time.sleep(0.05)


def test_messages_carry_sampling_params_whole():
    params = SamplingParams(max_tokens=3, temperature=0.5, stop=["x"], seed=9, logprobs=2)
    params.a_field_added_later = {"json_schema": {"type": "object"}}  # new fields need no change here
    add = messages.AddCall([messages.NewRequest("r-0", [1, 2, 3], messages.pack_params(params))])
    back = messages.input_decoder.decode(messages.encoder.encode(add))
    got = messages.unpack_params(back.requests[0].params)
    assert got == params and got.a_field_added_later == params.a_field_added_later
    step = messages.StepOutputs([messages.TokenOutput("r-0", [5], [{5: -0.5, 6: float("-inf")}], "stop", "x")],
                                messages.Gauges(1, 2, 0.5, 0.25, 10, 20, 0))
    assert messages.output_decoder.decode(messages.encoder.encode(step)) == step
