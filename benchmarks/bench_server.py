"""Serving benchmark: `minimax-m1 serve` in a process of its own (its engine core in another), N completion
requests of random token-id prompts, C at a time, from asyncio httpx clients; then LLM.generate on the
same requests in this process, for the fraction of the engine's speed the server delivers.

Prints per concurrency: output tok/s, TTFT and TPOT p50/p99, failed requests (by error), and at the end
LLM.generate's tok/s and how many server outputs equal the offline ones (greedy; on a GPU, batch shapes
may change bf16 roundings, so a mismatch there is information, not a failure).

    python benchmarks/bench_server.py --model tiny --device cpu --num-requests 512 --concurrency 1 64 256
    python benchmarks/bench_server.py --model minimax-m1:3-8 --load-format dummy --prompt-len 1024 \\
        --output-len 128 --num-requests 512 --concurrency 1 256 [--async-scheduling both]

The load comes from --client-processes client processes (default 4): a single Python client parsing every
SSE event of 256 streams is slower than the server (measured on an H200: 3252 tok/s from one process, 4797
from four), and each row says how busy the busiest client, the API server and the engine core were.

A preset without a tokenizer (the real-shape slices) gets a word-level one over its whole vocabulary (token
i reads "t{i} "), so any token the dummy weights pick decodes. The load itself (`run_load`) is what the CPU
soak test drives too."""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


@dataclasses.dataclass
class Result:
    ok: bool
    text: str = ""
    tokens: int = 0
    ttft: float | None = None  # s, streamed only
    tpot: float | None = None  # s per token after the first, streamed only
    error: str | None = None


def request_body(prompt: list[int], output_len: int, stream: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    try:
        if not body["stream"]:
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {r.text[:200]}")
            data = r.json()
            return Result(True, data["choices"][0]["text"], data["usage"]["completion_tokens"])
        text, first, last, tokens = [], None, None, 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, error=f"error event: {chunk['error']}")
                if chunk.get("choices"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    text.append(chunk["choices"][0]["text"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if not done:
                return Result(False, error="the stream ended without [DONE]")
        ttft = None if first is None else first - start
        tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
        return Result(True, "".join(text), tokens, ttft, tpot)
    except Exception as e:  # noqa: BLE001 - counted and reported
        return Result(False, error=f"{type(e).__name__}: {e}")


async def run_load(url: str, bodies: list[dict], concurrency: int, timeout: float = 600.0
                   ) -> tuple[list[Result], float]:
    """Send the bodies, `concurrency` at a time (each worker takes the next); (results in order, seconds)."""
    results: list[Result | None] = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        async def worker():
            for i in todo:
                results[i] = await one_request(client, url, bodies[i])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def _client_part(args) -> tuple[list[Result], float, float, float]:
    """One client process's share: (results, start and end on the system's monotonic clock, CPU seconds)."""
    url, bodies, concurrency, timeout = args
    cpu, start = time.process_time(), time.monotonic()
    results, _ = asyncio.run(run_load(url, bodies, concurrency, timeout))
    return results, start, time.monotonic(), time.process_time() - cpu


def run_clients(url: str, bodies: list[dict], concurrency: int, processes: int, timeout: float = 600.0
                ) -> tuple[list[Result], float, float]:
    """The load from `processes` client processes (bodies dealt round-robin, the concurrency split): one
    asyncio client parses every SSE event in Python, and at hundreds of streams it can be what limits the
    measured rate. -> (results in order, seconds from the first request to the last answer, the busiest
    client's CPU share). Spawned processes (the caller may hold threads), bounded by `timeout`."""
    processes = max(1, min(processes, concurrency, len(bodies)))
    if processes == 1:
        results, start, end, cpu = _client_part((url, bodies, concurrency, timeout))
        return results, end - start, cpu / (end - start)
    import multiprocessing

    parts = [(url, bodies[k::processes], -(-concurrency // processes), timeout) for k in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        done = pool.map_async(_client_part, parts).get(timeout + 60)
    seconds = max(end for _, _, end, _ in done) - min(start for _, start, _, _ in done)
    results: list[Result | None] = [None] * len(bodies)
    for k, (part, _, _, _) in enumerate(done):
        results[k::processes] = part
    return results, seconds, max(cpu / (end - start) for _, start, end, cpu in done)


def _stat(pid) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first, then ppid, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the API server process and of its children (the engine core): who is busy."""
    children = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(entry)
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == pid:
                children += _cpu_seconds(fields)
    return _cpu_seconds(_stat(pid)), children


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    errors = collections.Counter(r.error.split(":")[0] for r in results if not r.ok)
    return dict(tok_s=sum(r.tokens for r in ok) / seconds, seconds=seconds, ttft_p50=percentile(ttft, 0.5),
                ttft_p99=percentile(ttft, 0.99), tpot_p50=percentile(tpot, 0.5), tpot_p99=percentile(tpot, 0.99),
                requests=len(results), failed=len(results) - len(ok), errors=dict(errors),
                first_errors=[r.error for r in results if not r.ok][:3])


# ---- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def word_tokenizer(vocab_size: int, path: str) -> str:
    """A tokenizer.json in `path` whose token i is the word "t{i}" (decoded with spaces between)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def model_vocab(a) -> int:
    from minimax_m1.config import minimax_m1_config

    return minimax_m1_config().vocab_size


@contextlib.contextmanager
def serve(a, engine_flags: list[str], log_path: str):
    """`minimax-m1 serve` on a free port until the block ends (SIGTERM, then SIGKILL of its group)."""
    port = free_port()
    cmd = [sys.executable, "-m", "minimax_m1.cli", "serve", "--port", str(port), "--uvicorn-log-level", "warning",
           *engine_flags, *a.server_flags]
    log = open(log_path, "w+b")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + a.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the server exited while starting:\n" + open(log_path).read()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not come up:\n" + open(log_path).read()[-3000:])
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()


def offline(a, prompts: list[list[int]], tokenizer_dir: str | None, use_async: bool | None = None
            ) -> tuple[float, list[str]]:
    """LLM.generate on the same requests: (output tok/s, texts)."""
    import torch

    from minimax_m1 import LLM, SamplingParams

    llm = LLM(a.model, load_format=a.load_format, device=a.device, tokenizer=tokenizer_dir,
              max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
              max_num_batched_tokens=a.max_num_batched_tokens, async_scheduling=use_async, progress=False)
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:min(len(prompts), 8)], sampling_params=params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - start
    llm.shutdown()
    del llm
    gc.collect()  # the engine's device memory back before the next server starts (--async-scheduling both)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds, [o.outputs[0].text for o in outs]


# --async-scheduling as measure() takes it: (what the table says, the saved log's suffix); None: no flag
ASYNC_MODES = {None: ("the engine's default", ""), False: ("off", ".sync"), True: ("on", ".async")}


def measure(a, use_async: bool | None, prompts: list[list[int]], bodies: list[dict], streamed: list[bool],
            tokenizer_dir: str | None, log_path: str) -> int:
    """One server (and LLM.generate) under every concurrency: prints the table; 1 if a request failed."""
    flags = ["--model", a.model, "--load-format", a.load_format, "--max-num-seqs", str(a.max_num_seqs),
             "--max-model-len", str(a.max_model_len), "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    flags += ["--device", a.device] if a.device else []
    flags += ["--tokenizer", tokenizer_dir] if tokenizer_dir else []
    if use_async is not None:  # None: the engine's default (on with one CUDA device)
        flags += ["--async-scheduling" if use_async else "--no-async-scheduling"]

    rows, texts = [], [None] * len(bodies)
    with serve(a, flags, log_path) as (url, pid):
        asyncio.run(run_load(url, bodies[:min(8, len(bodies))], min(8, len(bodies))))  # warm-up
        for c in a.concurrency:
            load = bodies[:a.serial_requests] if c == 1 else bodies
            cpu0 = server_cpu(pid)
            results, seconds, client = run_clients(url, load, c, a.client_processes)
            api, core = (b - a0 for a0, b in zip(cpu0, server_cpu(pid)))
            rows.append((c, dict(summary(results, seconds), client_cpu=client, api_cpu=api / seconds,
                                 core_cpu=core / seconds)))
            if len(load) == len(bodies):
                texts = [r.text if r.ok else None for r in results]
    log = open(log_path, errors="replace").read()
    if a.save_log:
        with open(a.save_log + ASYNC_MODES[use_async][1], "w") as f:
            f.write(log)
    dropped = [line for line in log.splitlines() if "dropped" in line.lower() or "WARNING" in line]

    print(f"\nmodel {a.model}  prompt {a.prompt_len}  output {a.output_len}  requests {a.num_requests}  "
          f"streamed {sum(streamed)}/{len(streamed)}  async scheduling {ASYNC_MODES[use_async][0]}")
    print(f"{'conc':>5} {'reqs':>5} {'tok/s':>9} {'s':>7} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} {'failed':>7}  errors")
    for c, r in rows:
        print(f"{c:>5} {r['requests']:>5} {r['tok_s']:>9.0f} {r['seconds']:>7.2f} {r['ttft_p50'] * 1e3:>8.1f}m {r['ttft_p99'] * 1e3:>7.1f}m "
              f"{r['tpot_p50'] * 1e3:>8.2f}m {r['tpot_p99'] * 1e3:>7.2f}m {r['failed']:>7}  {r['errors'] or ''}")
        print(f"      CPU busy: client {100 * r['client_cpu']:.0f}% (busiest process), API server "
              f"{100 * r['api_cpu']:.0f}%, engine core and other children {100 * r['core_cpu']:.0f}%")
        for e in r["first_errors"]:
            print(f"      e.g. {e[:300]}")
    print(f"server log: {len(dropped)} warning lines" + "".join(f"\n      {line[:300]}" for line in dropped[:10]))
    if not a.skip_offline:
        tok_s, offline_texts = offline(a, prompts, tokenizer_dir, use_async)
        same = sum(t == o for t, o in zip(texts, offline_texts))
        print(f"LLM.generate: {tok_s:.0f} tok/s; server at concurrency {rows[-1][0]}: "
              f"{rows[-1][1]['tok_s'] / tok_s:.2f} of it; outputs equal to LLM.generate's: {same}/{len(texts)}")
    return 1 if any(r["failed"] for _, r in rows) else 0

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 256])
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--serial-requests", type=int, default=32,
                   help="at concurrency 1, only the first N requests (a TPOT sample; 512 one at a time take minutes)")
    p.add_argument("--client-processes", type=int, default=4,
                   help="client processes sharing the load (one asyncio process parsing 256 SSE streams was the "
                        "limit on an H200: 70%% of a core busy, 0.68 of the rate four gave)")
    p.add_argument("--stream-fraction", type=float, default=1.0, help="the share of requests streamed")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None, help="default: prompt + output + 16")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--startup-timeout", type=float, default=1200.0)
    p.add_argument("--save-log", default=None, help="copy the server's log here")
    p.add_argument("--async-scheduling", default="default", choices=["default", "off", "on", "both"],
                   help="the engine's --async-scheduling, for the server and LLM.generate (default: the "
                        "engine's own, on with one CUDA device); both: the whole measurement without it, then "
                        "with it (one run, to compare)")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--server-flags", nargs=argparse.REMAINDER, default=[], help="more `serve` flags (last)")
    a = p.parse_args(argv)
    a.max_model_len = a.max_model_len or a.prompt_len + a.output_len + 16

    rng = random.Random(0)
    tmp = tempfile.mkdtemp(prefix="bench-server-")
    tokenizer_dir = None
    if a.model.startswith("minimax-m1"):
        tokenizer_dir = word_tokenizer(model_vocab(a), tmp)
    vocab = 256 if a.model == "tiny" else (model_vocab(a) if tokenizer_dir else 1000)
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt_len)] for _ in range(a.num_requests)]
    streamed = [rng.random() < a.stream_fraction for _ in prompts]
    bodies = [request_body(pr, a.output_len, s) for pr, s in zip(prompts, streamed)]
    modes = {"default": [None], "off": [False], "on": [True], "both": [False, True]}[a.async_scheduling]
    return max(measure(a, m, prompts, bodies, streamed, tokenizer_dir, os.path.join(tmp, f"server-{m}.log"))
               for m in modes)


if __name__ == "__main__":
    sys.exit(main())
