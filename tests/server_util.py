"""Helpers the server tests share: the hardened server in a background thread, a `serve` subprocess, and
/metrics as a dict."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from minimax_m1.server.args import ServerArgs
from minimax_m1.server.launch import build_server

TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, **limits):
    """Serve app (build_app's) with the hardened uvicorn server in a background thread on a free loopback
    port; yields the base URL (app.state.uvicorn_server is the server). `limits`: ServerArgs fields for the
    connection settings."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = build_server(app, ServerArgs(log_level="warning", **limits))
    app.state.uvicorn_server = srv  # for tests that watch it stop
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=TIMEOUT).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_until_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["minimax_m1_num_requests_running"] == 0 and m["minimax_m1_state_pool_usage"] == 0 \
                and m["minimax_m1_kv_cache_usage"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests were not freed: {m}"
        time.sleep(0.05)


class ServeProcess:
    """`python -m minimax_m1.cli serve --model tiny ...` on a free port, its output in a file; always killed
    (with its process group) at exit."""

    def __init__(self, *flags: str, env: dict | None = None, preexec_fn=None, log_path=None,
                 model: tuple[str, ...] = ("--model", "tiny")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "minimax_m1.cli", "serve", *model, "--port", str(self.port), *flags]
        base = {k: v for k, v in os.environ.items() if k != "MINIMAX_M1_API_KEY"}
        self.log_path = log_path
        self._log = open(log_path, "w+b")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**base, **(env or {})},
                                     preexec_fn=preexec_fn, start_new_session=True)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up:\n" + self.output()
            time.sleep(0.2)

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (from /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
