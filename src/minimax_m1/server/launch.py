"""Serving the app with uvicorn, hardened: connection timeouts and a connection cap (a protocol that adds
what uvicorn lacks: a deadline for a request's headers and for its body), quiet handling of fd
exhaustion, and shutdown on signals.

Shutdown: the first SIGTERM or SIGINT stops admission (new requests get 503, /health fails) and lets the
requests under way finish for up to --shutdown-timeout; then they are aborted (their clients get an error
event or a 503) and the process exits 0. A second signal exits at once. If the engine fails for good the
server stops and run_server returns 1, so that a supervisor restarts the process."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .args import ServerArgs
from .async_engine import AsyncEngine, ShuttingDownError

logger = logging.getLogger(__name__)

_FD_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s")
_REFUSED_BODY = (b'{"error":{"message":"too many open connections: retry later","type":"server_error",'
                 b'"param":null,"code":"too_many_connections"}}')
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class _Overload:
    """Logs refused connections (over the cap, or out of file descriptors) at most once a minute, with how
    many were refused since: a flood of them must not become a flood of log lines."""
    INTERVAL_S = 60.0

    def __init__(self):
        self.last, self.count = -self.INTERVAL_S, 0

    def refuse(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.INTERVAL_S:
            logger.warning("refusing new connections: %s (%d refused since the last such line; at most one a "
                           "minute)", why, self.count)
            self.last, self.count = now, 0


class _Drops:
    """Warns of each connection the server cuts with a request on it (a deadline missed, a client gone with
    its response under way), at most LIMIT lines a minute, then how many more there were."""
    LIMIT, INTERVAL_S = 20, 60.0

    def __init__(self):
        self.start, self.lines, self.quiet = -self.INTERVAL_S, 0, 0

    def warn(self, peer, why: str) -> None:
        now = time.monotonic()
        if now - self.start >= self.INTERVAL_S:
            if self.quiet:
                logger.warning("%d more connections were dropped in the last minute", self.quiet)
            self.start, self.lines, self.quiet = now, 0, 0
        if self.lines < self.LIMIT:
            self.lines += 1
            logger.warning("dropped the connection from %s: %s", peer, why)
        else:
            self.quiet += 1


def _readable(transport) -> bool:
    """Whether bytes (or the peer's close) wait in the socket unread: then it is not idle."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


class HardenedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus: a connection cap (over it, a 503 and close, before any state is kept)
    and two deadlines: the headers of each request within timeout_header of the connection or of the
    request's first byte, its body within timeout_body of its headers (then 408 and close). uvicorn's own
    keep-alive timeout closes idle connections between requests, but never one whose next request is
    already in the socket: closing it would reset the connection under the client's request (a read
    error for the client), a race each keep-alive client meets when its idle expiry equals the server's
    (httpx's is 5 s: the default here is longer). Every connection cut with a request on it is logged."""
    args: ServerArgs  # set by build_server
    overload: _Overload
    drops: _Drops

    def connection_made(self, transport) -> None:
        self._timer, self._timed_cycle, self._refused, self._phase = None, None, False, None
        self._idle = False  # between requests: the next request's first byte starts its header deadline
        if len(self.server_state.connections) >= self.args.max_connections:
            self._refused = True
            self.overload.refuse(f"{self.args.max_connections} connections are open (--max-connections)")
            transport.write(_REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY))
            transport.close()
            return
        super().connection_made(transport)
        self._arm("headers", self.args.timeout_header)

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        self._disarm()
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            if exc is not None:
                self.drops.warn(self.client, f"lost with a response under way ({type(exc).__name__}: {exc})")
            else:
                logger.info("client %s closed its connection with a response under way", self.client)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._idle:
            self._idle = False
            self._arm("headers", self.args.timeout_header)  # disarmed at once if the headers are all here
        super().data_received(data)

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing() and _readable(self.transport):
            return  # a request (or the client's close) is in the socket: data_received comes next
        super().timeout_keep_alive_handler()

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not self._timed_cycle:  # a request's headers arrived
            self._timed_cycle = cycle
            self._disarm()
            if cycle.more_body:
                self._arm("body", self.args.timeout_body)
        elif self._phase == "body" and not cycle.more_body:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request started
            self._idle = True  # the keep-alive timeout governs until the next request's first byte

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase, self._timer = phase, self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._phase = self._timer = None

    def _timed_out(self) -> None:
        phase, cycle = self._phase, self.cycle
        self._phase = self._timer = None
        if self.transport.is_closing():
            return
        if phase == "headers" and not self.conn.trailing_data[0] and _readable(self.transport):
            self._arm("headers", self.args.timeout_header)  # its bytes just arrived: read them first
            return
        self.drops.warn(self.client, f"no complete request {phase} within "
                        f"{self.args.timeout_header if phase == 'headers' else self.args.timeout_body:g} s "
                        f"(--timeout-{'header' if phase == 'headers' else 'body'})")
        if phase == "body":
            if not cycle.response_started:
                self.transport.write(self.conn.send(h11.Response(status_code=408, reason=b"Request Timeout",
                                                                 headers=[(b"connection", b"close"),
                                                                          (b"content-length", b"0")])))
            cycle.disconnected = True  # the app's receive() now says the client left
            cycle.message_event.set()
        elif self.conn.trailing_data[0]:  # half of a request's headers
            self.transport.write(_TIMED_OUT)
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server with this module's shutdown (no re-raised signal after a drain: exit 0) and
    exit_code 1 once the engine has failed for good."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float, overload: _Overload):
        super().__init__(config)
        self.engine, self.shutdown_timeout, self.overload = engine, shutdown_timeout, overload
        self.exit_code = 0
        self._drain_until: float | None = None
        self._spare_fd: int | None = None  # closed to make room for refusing a connection when fds run out
        engine.on_fatal = self._engine_failed

    def _engine_failed(self) -> None:  # on the engine thread
        logger.critical("the engine failed for good: stopping the server (exit code 1) for a restart")
        self.exit_code, self.should_exit = 1, True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_until is not None or self.should_exit:
            sys.stderr.write(f"minimax-m1: second signal ({signal.Signals(sig).name}): exiting now\n")
            sys.stderr.flush()
            os._exit(128 + sig)
        self._drain_until = time.monotonic() + self.shutdown_timeout

    async def startup(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        await super().startup(sockets)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and not self.should_exit:
            if not self.engine.draining:
                logger.info("shutting down: no new requests; %d under way get up to %.0f s to finish "
                            "(a second signal exits at once)", self.engine.num_in_flight, self.shutdown_timeout)
                self.engine.stop_admission()
            if self.engine.num_in_flight == 0:
                self.should_exit = True
            elif time.monotonic() >= self._drain_until:
                logger.warning("shutdown timeout: aborting %d requests", self.engine.num_in_flight)
                self.engine.abort_all(ShuttingDownError("the server is shutting down: the request was aborted "
                                                        "at the end of --shutdown-timeout"))
                self.should_exit = True
        return await super().on_tick(counter)

    def _loop_exception(self, loop, context) -> None:
        """Out of file descriptors, asyncio's accept loop fails for every waiting connection and reports
        each failure with a traceback. Instead: log it at most once a minute, and refuse the waiting
        connection (a 503, then close) in the room the spare descriptor makes, so that clients are told
        at once rather than left hanging, and the accept loop ends when none are left waiting."""
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _FD_ERRNOS):
            loop.default_exception_handler(context)
            return
        self.overload.refuse(f"accept() failed: {exc.strerror} (raise the open-file limit or lower --max-connections)")
        listener = context.get("socket")
        if listener is None or self._spare_fd is None:
            return
        os.close(self._spare_fd)
        self._spare_fd = None
        sock = socket.socket(fileno=listener.fileno())  # the listening socket itself, not a copy
        try:
            conn, _ = sock.accept()
        except OSError:
            pass
        else:
            with conn:
                with contextlib.suppress(OSError):
                    conn.send(_REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY))
        finally:
            sock.detach()
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY)


def build_server(app, args: ServerArgs) -> Server:
    overload = _Overload()
    protocol = type("Protocol", (HardenedH11Protocol,), {"args": args, "overload": overload, "drops": _Drops()})
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, http=protocol, loop="asyncio",
        ws="none", lifespan="on", timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=5,  # after the drain: time for aborted streams to send their last event
        h11_max_incomplete_event_size=16 * 1024)  # request line and headers
    return Server(config, app.state.engine, args.shutdown_timeout, overload)


def run_server(app, args: ServerArgs, sock: socket.socket | None = None) -> int:
    """Serve until a signal or a fatal engine error; the process's exit code."""
    server = build_server(app, args)
    server.run(sockets=[sock] if sock is not None else None)
    return server.exit_code
