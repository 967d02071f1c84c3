"""`minimax-m1 serve --model tiny` as a real process: SIGTERM with streams in flight drains and exits 0
within --shutdown-timeout (new requests get 503 meanwhile), a second signal exits at once, and running out
of file descriptors neither spins nor floods the log."""
import contextlib
import resource
import signal
import socket
import threading
import time

import pytest

for _name in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_name)

import httpx  # noqa: E402

from server_util import ServeProcess  # noqa: E402

STREAM = {"messages": [{"role": "user", "content": "talk forever"}], "stream": True, "ignore_eos": True}


def _open_streams(url: str, count: int) -> tuple[list, threading.Barrier]:
    """count chat streams without max_tokens, each in a thread; returns their results (filled as they end:
    the text received, or the exception) and a barrier passed once each has its first chunk."""
    results, started = [None] * count, threading.Barrier(count + 1, timeout=60)

    def one(i):
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=STREAM, timeout=120) as r:
                chunks = r.iter_text()
                first = next(chunks)
                started.wait()
                results[i] = first + "".join(chunks)
        except Exception as e:  # noqa: BLE001 - reported by the test
            results[i] = e
            started.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    started.wait()
    return results, threads


def test_sigterm_drains_then_aborts_streams_and_exits_0(tmp_path):
    with ServeProcess("--max-model-len", "65536", "--shutdown-timeout", "3", log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        results, threads = _open_streams(srv.url, 8)
        start = time.monotonic()
        srv.signal(signal.SIGTERM)
        time.sleep(0.5)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert r.headers["connection"] == "close"
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        code = srv.proc.wait(15)
        took = time.monotonic() - start
        for t in threads:
            t.join(10)
        output = srv.output()
    assert code == 0, output
    assert 3.0 <= took < 3.0 + 5.0, took  # the shutdown timeout, then a bounded close
    for text in results:  # each stream ended with an error event and [DONE], not a cut connection
        assert isinstance(text, str), text
        assert '"code":"shutting_down"' in text and text.endswith("data: [DONE]\n\n"), text[-300:]
    assert "Traceback" not in output, output


def test_sigterm_when_idle_exits_at_once_and_a_second_signal_forces_exit(tmp_path):
    with ServeProcess("--max-model-len", "65536", "--shutdown-timeout", "60", log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        _open_streams(srv.url, 2)
        srv.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.proc.poll() is None  # draining: the streams have 60 s
        start = time.monotonic()
        srv.signal(signal.SIGINT)
        code = srv.proc.wait(10)
        assert time.monotonic() - start < 2.0 and code == 128 + signal.SIGINT, srv.output()
    with ServeProcess(log_path=tmp_path / "log2") as srv:
        srv.wait_healthy()
        start = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0 and time.monotonic() - start < 3.0, srv.output()


def _limit_files(n: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


def test_out_of_file_descriptors_refuses_quietly_and_recovers(tmp_path):
    """With 200 fds and --max-connections above that, 400 connections exhaust the process's descriptors:
    accept() fails with EMFILE. The server logs that once (not per attempt), does not spin, keeps serving
    the connections it has, and serves new ones once descriptors are free again."""
    flags = ("--max-connections", "1000", "--timeout-header", "30", "--uvicorn-log-level", "warning")
    with ServeProcess(*flags, preexec_fn=_limit_files(200), log_path=tmp_path / "log") as srv:
        srv.wait_healthy()
        host = "127.0.0.1"
        keep = httpx.Client(timeout=30)  # a keep-alive connection opened before the flood
        # a first request imports what requests need lazily (anyio's backend): no files to open later
        assert keep.post(srv.url + "/v1/completions", json={"prompt": "warm", "max_tokens": 2}).status_code == 200
        flood = []
        try:
            for _ in range(400):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((host, srv.port))
                flood.append(s)
            time.sleep(1.5)
            cpu = srv.cpu_seconds()
            time.sleep(3.0)
            busy = srv.cpu_seconds() - cpu
            replies = []
            for s in flood:
                with contextlib.suppress(OSError):
                    replies.append(s.recv(4096))
            refused = sum(b"too_many_connections" in r for r in replies)
            r = keep.post(srv.url + "/v1/completions", json={"prompt": "still", "max_tokens": 2})
            assert r.status_code == 200, r.text
        finally:
            for s in flood:
                s.close()
        time.sleep(1.5)  # asyncio retries accept() every second
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        keep.close()
        srv.signal(signal.SIGTERM)
        srv.proc.wait(15)
        output = srv.output()
    assert busy < 0.3, f"the server spun: {busy:.2f} s of CPU in 3 s"
    assert refused > 100, refused  # told at once, not left waiting in the backlog
    assert output.count("refusing new connections") == 1, output[-3000:]
    assert "Too many open files" in output and output.count("Traceback") == 0, output[-3000:]
    assert len(output) < 20_000, len(output)
