"""The engine behind the HTTP server: one background thread owns the LLMEngine and loops step() while
there is work, sleeping on a condition otherwise. Coroutines submit requests and aborts through
thread-safe queues; the thread applies them between steps (never concurrently with step()) and
hands each output to its request's asyncio queue with loop.call_soon_threadsafe."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator

from ..engine.llm_engine import LLMEngine
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .metrics import EngineMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can run any more."""


@dataclasses.dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    first_token_seen: bool = False


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or EngineMetrics()
        self._cond = threading.Condition()
        self._adds: list[tuple[EngineRequest, _Stream]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}  # requests in the engine, by id; only the engine thread removes
        self._stopping = False
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

    # ---- the event loop's side ------------------------------------------------------------------

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Run the requests together; yield every RequestOutput (cumulative text and tokens) as it comes.
        Leaving the iteration early (client gone, cancelled, closed) aborts the unfinished requests."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), time.monotonic())
        unfinished = {r.request_id for r in requests}
        with self._cond:
            if not self.is_healthy:
                raise EngineDeadError(f"the engine is not running: {self.error!r}")
            self._adds += [(r, stream) for r in requests]
            self._cond.notify()
        try:
            while unfinished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield item
        finally:
            if unfinished:
                self.abort(unfinished)

    def abort(self, request_ids) -> None:
        with self._cond:
            self._aborts += list(request_ids)
            self._cond.notify()

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._adds or self._aborts or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                for req, stream in adds:  # adds first: an abort may name a request submitted just before
                    self._add(req, stream)
                for rid in aborts:
                    self._abort(rid)
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    for out in outputs:
                        self._dispatch(out)
                self.metrics.update_gauges(self.engine)
        except BaseException as e:  # a bug or an out-of-memory: fail every request, refuse new ones
            logger.exception("the engine thread failed")
            self.error = e
        finally:
            self._fail_all(self.error or EngineDeadError("the server is shutting down"))

    def _add(self, req: EngineRequest, stream: _Stream) -> None:
        try:
            self.engine.add_request(req.request_id, req.prompt_token_ids, req.params, prompt=req.prompt)
        except Exception as e:  # noqa: BLE001 - the server validates first; a bad request must not stop the engine
            _put(stream, e)
            return
        with self._cond:
            self._streams[req.request_id] = stream

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        with self._cond:
            stream = self._streams.pop(request_id, None)
        if stream is not None:  # still unfinished: the client left
            self.metrics.on_finish("abort", time.monotonic() - stream.arrival)

    def _dispatch(self, out: RequestOutput) -> None:
        with self._cond:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if stream is None:
            return
        if not stream.first_token_seen and out.outputs[0].token_ids:
            stream.first_token_seen = True
            self.metrics.on_first_token(time.monotonic() - stream.arrival)
        if out.finished:
            self.metrics.on_finish(out.outputs[0].finish_reason, time.monotonic() - stream.arrival)
        _put(stream, out)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            streams = list(self._streams.values()) + [s for _, s in self._adds]
            self._streams.clear()
            self._adds.clear()
        for stream in streams:
            _put(stream, error if isinstance(error, EngineDeadError) else EngineDeadError(repr(error)))


def _put(stream: _Stream, item) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass
