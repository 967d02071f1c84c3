"""The engine behind the HTTP server: one background thread owns the LLMEngine and loops step() while
there is work, sleeping on a condition otherwise. Coroutines submit requests and aborts through
thread-safe queues; the thread applies them between steps (never concurrently with step()) and hands
each output to its request's asyncio queue with loop.call_soon_threadsafe.

Admission is round-robin between client requests: the thread keeps each call's engine requests (its
prompts x n) in a queue of its own and gives the engine one from each call in turn, only as many as the
engine has sequence slots, so a request of 256 sequences does not make a small one wait behind it.

Faults: a request that fails inside the engine fails alone (RequestFailedError); a step that raises
fails the requests in the engine and the engine goes on; MAX_FAILED_STEPS failures in a row, or a
failed device, stop it for good: every request gets EngineDeadError and `on_fatal` is called (the
server then exits non-zero, for its supervisor to restart it)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from ..engine.llm_engine import EngineFatalError, LLMEngine
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from .metrics import EngineMetrics

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3
TIME_LIMIT = "max_request_seconds"  # the stop_reason of a request cut off by the time limit


class EngineUnavailable(RuntimeError):
    """No request can run now: HTTP 503."""
    code = "engine_unavailable"


class EngineDeadError(EngineUnavailable):
    """The engine thread failed; no request can run any more."""
    code = "engine_dead"


class ShuttingDownError(EngineUnavailable):
    """The server is shutting down: it takes no new requests, and aborts what is left at the deadline."""
    code = "shutting_down"


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (the others go on): HTTP 500."""


@dataclasses.dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclasses.dataclass(eq=False)
class _Call:
    """The engine requests of one generate() call (one client request) and where their outputs go."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    pending: collections.deque  # EngineRequests not yet given to the engine
    unfinished: set[str]
    first_token_seen: bool = False
    failed: bool = False  # an exception was put: nothing more goes to the queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None,
                 max_request_seconds: float | None = None, on_fatal: Callable[[], None] | None = None):
        self.engine = engine
        self.metrics = metrics or EngineMetrics()
        self.max_request_seconds = max_request_seconds
        self.on_fatal = on_fatal
        self._slots = engine.scheduler.max_num_seqs  # engine requests admitted at once
        self._cond = threading.Condition()
        self._adds: list[_Call] = []
        self._aborts: list[_Call] = []
        self._abort_all: BaseException | None = None
        self._queue: collections.deque[_Call] = collections.deque()  # calls with pending requests, in turn
        self._in_engine: dict[str, _Call] = {}  # engine requests the engine holds, by id
        self._by_arrival: collections.deque[_Call] = collections.deque()  # for the time limit (one for all)
        self._failed_steps = 0
        self._stopping = False
        self.draining = False
        self.num_in_flight = 0  # generate() calls under way (the event loop's count)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="minimax-m1-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self.is_healthy and not self.draining

    def stop_admission(self) -> None:
        """New requests get ShuttingDownError from now on; those under way go on."""
        self.draining = True

    def abort_all(self, error: BaseException) -> None:
        """End every request under way with `error`."""
        with self._cond:
            self._abort_all = error
            self._cond.notify()

    # ---- the event loop's side ------------------------------------------------------------------

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Run the requests together; yield every RequestOutput as it comes. Leaving the iteration early
        (client gone, cancelled, closed) aborts the unfinished requests."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        call = _Call(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), collections.deque(requests),
                     {r.request_id for r in requests})
        with self._cond:
            if not self.is_healthy:
                raise EngineDeadError(f"the engine is not running: {self.error!r}")
            self._adds.append(call)
            self._cond.notify()
        self.num_in_flight += 1
        unfinished = set(call.unfinished)
        try:
            while unfinished:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            self.num_in_flight -= 1
            if unfinished:
                with self._cond:
                    self._aborts.append(call)
                    self._cond.notify()

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        fatal = False
        try:
            while True:
                with self._cond:
                    while not (self._adds or self._aborts or self._stopping or self._abort_all or self._queue
                               or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    abort_all, self._abort_all = self._abort_all, None
                for call in adds:  # adds first: an abort may name a call submitted just before
                    self._queue.append(call)
                    if self.max_request_seconds is not None:
                        self._by_arrival.append(call)
                for call in aborts:
                    self._abort(call)
                if abort_all is not None:
                    self._fail_all(abort_all)
                self._expire()
                self._admit()
                if self.engine.has_unfinished():
                    self._step()
                pending = sum(len(c.pending) for c in self._queue)
                self.metrics.update_gauges(self.engine, pending=pending)
                self.metrics.maybe_log(self.engine, pending)
        except BaseException as e:  # a failed device, or the engine could not be cleared after a failure
            logger.critical("the engine failed and cannot go on: %s: %s", type(e).__name__, e, exc_info=e)
            self.error, fatal = e, True
        finally:
            self._fail_all(EngineDeadError(repr(self.error)) if fatal else
                           ShuttingDownError("the server shut down before the request finished"))
            if fatal and self.on_fatal is not None:
                self.on_fatal()

    def _admit(self) -> None:
        """Give the engine one pending request from each call in turn while it has free sequence slots."""
        while self._queue and len(self._in_engine) < self._slots:
            call = self._queue.popleft()
            req = call.pending.popleft()
            try:
                self.engine.add_request(req.request_id, req.prompt_token_ids, req.params, prompt=req.prompt)
            except Exception as e:  # noqa: BLE001 - the server validates first; a bad request must not stop the engine
                call.unfinished.discard(req.request_id)
                self._drop_pending(call)
                _put(call, e)
                continue
            self._in_engine[req.request_id] = call
            if call.pending:
                self._queue.append(call)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineFatalError:
            raise
        except Exception as e:  # noqa: BLE001 - the engine fails its requests itself; this is a bug's backstop
            self._failed_steps += 1
            logger.exception("an engine step failed (%d in a row)", self._failed_steps)
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise EngineFatalError(f"{self._failed_steps} engine steps failed in a row; the last: {e!r}") from e
            for rid, call in list(self._in_engine.items()):
                self.engine.abort_request(rid)
                self._finished(rid, "error")
                _put(call, RequestFailedError(f"request {rid} failed in an engine step: {type(e).__name__}: {e}"))
            if self.engine.has_unfinished() or self.engine.requests:
                raise EngineFatalError("the engine still holds requests after failing them all") from e
            return
        self._failed_steps = 0
        for out in outputs:
            self._dispatch(out)

    def _dispatch(self, out: RequestOutput) -> None:
        call = self._in_engine.get(out.request_id)
        if call is None:
            return
        o = out.outputs[0]
        if out.finished:
            self._finished(out.request_id, o.finish_reason)
        if o.finish_reason == "error":
            _put(call, RequestFailedError(f"request {out.request_id} failed in the engine: {o.error}"))
            return
        if not call.first_token_seen and o.token_ids:
            call.first_token_seen = True
            self.metrics.on_first_token(time.monotonic() - call.arrival)
        _put(call, out)

    def _finished(self, request_id: str, reason: str | None) -> None:
        call = self._in_engine.pop(request_id)
        call.unfinished.discard(request_id)
        self.metrics.on_finish(reason, time.monotonic() - call.arrival)

    def _expire(self) -> None:
        """Finish the requests of calls past --max-request-seconds: finish_reason "length", stop_reason
        TIME_LIMIT, with what they generated so far."""
        if self.max_request_seconds is None:
            return
        start = time.monotonic() - self.max_request_seconds
        while self._by_arrival and (not self._by_arrival[0].unfinished or self._by_arrival[0].arrival <= start):
            call = self._by_arrival.popleft()
            self._drop_pending(call, lambda req: RequestOutput(
                req.request_id, req.prompt, req.prompt_token_ids,
                [CompletionOutput(0, "", [], finish_reason="length", stop_reason=TIME_LIMIT)], finished=True))
            for rid in [r for r, c in self._in_engine.items() if c is call]:
                out = self.engine.finish_request(rid, "length", TIME_LIMIT)
                if out is not None:
                    self._dispatch(out)

    def _drop_pending(self, call: _Call, output: Callable | None = None) -> None:
        """Take the call's requests the engine has not seen out of the queue (each ends with output(req))."""
        if call.pending:
            with contextlib.suppress(ValueError):  # not queued while _admit holds it
                self._queue.remove(call)
        for req in call.pending:
            call.unfinished.discard(req.request_id)
            self.metrics.on_finish("length" if output else "abort", time.monotonic() - call.arrival)
            if output is not None:
                _put(call, output(req))
        call.pending.clear()

    def _abort(self, call: _Call) -> None:
        self._drop_pending(call)
        for rid in [r for r, c in self._in_engine.items() if c is call]:
            self.engine.abort_request(rid)
            self._finished(rid, "abort")

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            calls = list(self._adds)
            self._adds.clear()
        calls += list(self._queue) + list(self._in_engine.values())
        self._queue.clear()
        for rid in list(self._in_engine):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - a broken engine: the requests are lost either way
                logger.exception("aborting %s failed", rid)
            self._finished(rid, "abort")
        for call in calls:
            call.pending.clear()
            call.unfinished.clear()
            _put(call, error)
        self._by_arrival.clear()


def _put(call: _Call, item) -> None:
    if call.failed:
        return
    call.failed = isinstance(item, BaseException)
    try:
        call.loop.call_soon_threadsafe(call.queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass
