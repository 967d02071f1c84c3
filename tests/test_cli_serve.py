"""First contact with the command line: `serve MODEL` positionally, --version, --help with defaults, a port in
use and a broken --chat-template found before the model loads, the start-up summary and the throughput lines;
`generate --stop --min-p --logprobs`."""
import os
import socket
import subprocess
import sys
import time
import types

import pytest

from minimax_m1 import __version__
from minimax_m1.engine import report

pytest.importorskip("httpx")
from server_util import ServeProcess  # noqa: E402

TIMEOUT = 300


def _run(*args, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "minimax_m1.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MINIMAX_M1_DEBUG": ""})


def test_version_and_help_with_defaults():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"minimax-m1 {__version__}"
    serve = _run("serve", "--help").stdout
    assert "MODEL" in serve and "--tokenizer" in serve and "--tool-call-parser" in serve
    assert "(default: 8000)" in serve and "(default: minimax_m1)" in serve and "(default: None)" not in serve
    generate = _run("generate", "--help").stdout
    for flag in ("--stop", "--min-p", "--logprobs"):
        assert flag in generate
    assert "(default: 64)" in generate and "(default: 0.0)" in generate


def test_port_in_use_is_found_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start = time.monotonic()
        r = _run("serve", "tiny", "--port", str(port), timeout=60)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr, r.stderr
    assert "cache:" not in r.stderr  # the engine was never built
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("template,match", [("{% if %}", "does not compile"),
                                            ("{{ messages[0]['nope']['x'] }}", "failed")])
def test_broken_chat_template_fails_at_start_up(template, match):
    r = _run("serve", "tiny", "--chat-template", template, "--port", "0", timeout=60)
    assert r.returncode == 2 and "--chat-template" in r.stderr and match in r.stderr, r.stderr
    assert "cache:" not in r.stderr


def test_model_given_once():
    r = _run("serve", timeout=60)
    assert r.returncode == 2 and "serve needs a model" in r.stderr
    r = _run("serve", "tiny", "--model", "other", timeout=60)
    assert r.returncode == 2 and "given twice" in r.stderr


def test_serve_positional_logs_a_summary(tmp_path):
    import httpx

    with ServeProcess(model=("tiny",), log_path=tmp_path / "log") as server:
        server.wait_healthy()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        log = server.output()
    line = next(x for x in log.splitlines() if "serving tiny as tiny" in x)
    for part in ("float32 on cpu", "tensor parallel 1", "state slots", "KV blocks", "max_model_len", "eager"):
        assert part in line, line


def test_throughput_lines():
    engine = types.SimpleNamespace(num_prompt_tokens=0, num_generated_tokens=0,
                                   scheduler=types.SimpleNamespace(running=[1, 2], waiting=[3]),
                                   cache=types.SimpleNamespace(usage=lambda: types.SimpleNamespace(
                                       state_slots=0.5, kv_blocks=0.25)))
    m = report.ThroughputLog()
    assert m.maybe_log(engine, now=100.0) is None  # the first call sets the baseline
    engine.num_prompt_tokens, engine.num_generated_tokens = 200, 50
    assert m.maybe_log(engine, now=105.0) is None  # not yet due
    line = m.maybe_log(engine, pending=2, now=110.0)
    assert line == ("throughput: 20.0 prompt tokens/s, 5.0 generated tokens/s; 2 running, 3 waiting; "
                    "state slots 50% used, KV cache 25% used")
    engine.scheduler = types.SimpleNamespace(running=[], waiting=[])
    assert m.maybe_log(engine, now=130.0) is None  # idle: nothing to say


def test_generate_stop_min_p_logprobs():
    base = ("generate", "--model", "tiny", "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos")
    full = _run(*base)
    assert full.returncode == 0, full.stderr
    text = full.stdout[:-1]
    stop = text[3:5]
    r = _run(*base, "--stop", stop, "--stop", "zzz-never", "--min-p", "0.05")
    assert r.returncode == 0 and r.stdout[:-1] == text[:text.index(stop)], (r.stdout, text)
    r = _run(*base, "--logprobs", "2")
    assert r.returncode == 0 and r.stdout == full.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 13 and lines[-1].startswith("cumulative logprob") and "rank 1" in lines[0]
