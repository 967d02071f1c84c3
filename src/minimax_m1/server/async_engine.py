"""The server's side of the engine core (engine/core.py): requests go to the core over ZeroMQ, and each
step's outputs come back in one message, which a task on the event loop turns into RequestOutputs: this
side detokenises and checks stop strings (a request that hits one is aborted in the core), so the core
only runs the model. The core is a process of its own (`in_process`, what `serve` uses) or a thread over an
engine the caller built (`in_thread`: tests, embedding); the channel and the code are the same.

Faults: a request that fails inside the engine fails alone (RequestFailedError); if the core dies or
declares itself dead, every request gets EngineDeadError, /health fails and `on_fatal` is called (the
server then exits non-zero, for its supervisor to restart it)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from ..engine import messages as msg
from ..engine.core import MAX_FAILED_STEPS, TIME_LIMIT, CoreProcess, CoreThread, ready_info  # noqa: F401
from ..engine.detokenizer import IncrementalDetokenizer
from ..engine.llm_engine import LLMEngine, check_prompt
from ..engine.text_output import completion_output, cut_at_stop, hold_back
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .metrics import EngineMetrics

logger = logging.getLogger(__name__)

SEND_RETRY_S = 0.005  # a message the core's socket did not take yet is offered again after this
CORE_POLL_MS = 200  # how often the output task looks at the core while no output comes
SHUTDOWN_JOIN_S = 10.0


class EngineUnavailable(RuntimeError):
    """No request can run now: HTTP 503."""
    code = "engine_unavailable"


class EngineDeadError(EngineUnavailable):
    """The engine core failed; no request can run any more."""
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


@dataclasses.dataclass
class EngineInfo:
    """What the server needs to know of the engine: its tokenizer and limits, and a grammar compiler of the
    same vocabulary (to refuse an unsupported structured output before it reaches the engine)."""
    tokenizer: object
    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    summary: str = ""  # the engine's start-up line (engine/report.engine_summary)
    eos_token_ids: tuple[int, ...] = ()
    engine: object = None  # the engine, when it runs in this process (its compiler and cache are shared)
    _compiler: object = None

    def validate_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.max_model_len, self.vocab_size)

    @property
    def grammar_compiler(self):
        if self.engine is not None:
            return self.engine.grammar_compiler
        if self._compiler is None:  # built on first use: it reads the whole tokenizer
            from ..structured import GrammarCompiler  # llguidance loads only when used

            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer (this model has no tokenizer.json)")
            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        return self._compiler


class _RequestState:
    """One engine request as the server sees it: the tokens the core sent, the text they make, and how much
    of both went out. Text and stop strings follow LLMEngine._append exactly, so outputs are the same as
    from an engine in process; the core checks EOS, stop tokens and lengths."""

    def __init__(self, req: EngineRequest, tokenizer):
        p = req.params
        self.req, self.params = req, p
        self.detokenizer = IncrementalDetokenizer(tokenizer, req.prompt_token_ids, p.skip_special_tokens)
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if p.logprobs is not None else None
        self.prompt_logprobs = None  # sent once by the core, passed on with the next output
        self.text = ""
        self.sent_tokens = self.sent_chars = 0
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.finished = False

    def advance(self, t: msg.TokenOutput) -> RequestOutput | None:
        """Take one step's tokens; the output to hand on (None: nothing to say yet)."""
        p = self.params
        if t.prompt_logprobs is not None:
            self.prompt_logprobs = t.prompt_logprobs
        last = len(t.token_ids) - 1
        for i, token in enumerate(t.token_ids):
            self.token_ids.append(token)
            if self.logprobs is not None:
                self.logprobs.append(t.logprobs[i] if t.logprobs is not None else None)
            self.detokenizer.add(token)
            text = self.detokenizer.text
            reason, stop_reason = (t.finish_reason, t.stop_reason) if i == last else (None, None)
            # "stop" from the core is EOS or a stop token, which come before stop strings
            if reason != "stop" and len(self.token_ids) >= p.min_tokens:
                text, stop = cut_at_stop(text, self.text, p)
                if stop is not None:
                    reason, stop_reason = "stop", stop
            self.text = hold_back(text, self.text, p) if reason is None else text
            if reason is not None:
                self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason
                break
        if not t.token_ids and t.finish_reason is not None:  # ended without a token (a time limit, too long)
            self.finished, self.finish_reason, self.stop_reason = True, t.finish_reason, t.stop_reason
        return self._output()

    def _output(self) -> RequestOutput | None:
        """In the params' output_kind, as LLMEngine._output (None: a final_only request still running)."""
        out = completion_output(self, self.token_ids)
        if out is None:
            return None
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        r = self.req
        return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids, [out], finished=self.finished,
                             prompt_logprobs=prompt_logprobs)


@dataclasses.dataclass(eq=False)
class _Call:
    """The engine requests of one generate() call (one client request) and where their outputs go."""
    queue: asyncio.Queue
    arrival: float
    first_token_seen: bool = False
    failed: bool = False  # an exception was put: nothing more goes to the queue

    def put(self, item) -> None:
        if not self.failed:
            self.failed = isinstance(item, BaseException)
            self.queue.put_nowait(item)


class AsyncEngine:
    """Use `in_thread` or `in_process`; `start()` on the event loop that will call generate()."""

    def __init__(self, core, info: EngineInfo, addrs: tuple[str, str, str], metrics: EngineMetrics | None = None,
                 on_fatal: Callable[[], None] | None = None):
        self.core, self.engine = core, info
        self.tokenizer = info.tokenizer
        self.metrics = metrics or EngineMetrics()
        self.on_fatal = on_fatal
        self._dir, self._input_addr, self._output_addr = addrs
        self._zmq = zmq.Context()
        self._input = self._zmq.socket(zmq.PUSH)  # plain: sends never block (no high-water mark)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(self._input_addr)
        self._aio: zmq.asyncio.Context | None = None
        self._output: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._requests: dict[str, tuple[_Call, _RequestState]] = {}  # unfinished engine requests
        self.draining = False
        self.num_in_flight = 0  # generate() calls under way
        self.error: BaseException | None = None
        self._stopped = False
        self._unsent: collections.deque[bytes] = collections.deque()  # refused while no core was connected
        self._retrying = False

    @staticmethod
    def _addresses() -> tuple[str, str, str]:
        d = tempfile.mkdtemp(prefix="minimax-m1-")
        return d, f"ipc://{d}/input", f"ipc://{d}/output"

    @classmethod
    def in_thread(cls, engine: LLMEngine, max_request_seconds: float | None = None, **kw) -> AsyncEngine:
        """The core over `engine` (built by the caller) in a thread of this process, started by start()."""
        addrs = cls._addresses()
        r = ready_info(engine)
        info = EngineInfo(engine.tokenizer, r.vocab_size, r.max_model_len, r.max_num_seqs, r.summary,
                          tuple(r.eos_token_ids), engine)
        self = cls(None, info, addrs, **kw)
        self._start_core = lambda: CoreThread(engine, addrs[1], addrs[2], max_request_seconds)
        return self

    @classmethod
    def in_process(cls, engine_args, tokenizer, max_request_seconds: float | None = None,
                   ready_timeout: float | None = None, **kw) -> AsyncEngine:
        """Spawn the engine-core process, which builds the engine from engine_args, and wait until it is
        ready (raises what building it raised). tokenizer: this side's copy of the model's tokenizer."""
        addrs = cls._addresses()
        core = CoreProcess(engine_args, addrs[1], addrs[2], max_request_seconds,
                           log_level=logging.getLogger("minimax_m1").getEffectiveLevel())
        try:
            ready = core.wait_ready(ready_timeout)
        except BaseException:
            core.kill()
            shutil.rmtree(addrs[0], ignore_errors=True)
            raise
        logger.info("engine core ready (pid %d): max_model_len %d", core.pid, ready.max_model_len)
        info = EngineInfo(tokenizer, ready.vocab_size, ready.max_model_len, ready.max_num_seqs, ready.summary,
                          tuple(ready.eos_token_ids))
        self = cls(core, info, addrs, **kw)
        self._start_core = lambda: core
        return self

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """On the event loop: connect to the core's outputs, start the thread core if it is one."""
        self._aio = zmq.asyncio.Context()
        self._output = self._aio.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(self._output_addr)
        self.core = self._start_core()
        self._task = asyncio.get_running_loop().create_task(self._output_loop())

    def shutdown(self, timeout: float = SHUTDOWN_JOIN_S) -> None:
        """Stop the core (Shutdown, then a kill if it does not exit in time) and close the channel."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        if self.core is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._input.send(msg.encoder.encode(msg.Shutdown()), zmq.NOBLOCK)
            self.core.join(timeout)
            if self.core.is_alive():
                logger.warning("the engine core did not stop within %.0f s: killing it", timeout)
                self.core.kill()
        self._fail_all(ShuttingDownError("the server shut down before the request finished"))
        self._input.close(linger=0)
        if self._output is not None:
            self._output.close(linger=0)
        self._zmq.term()
        if self._aio is not None:
            self._aio.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def is_healthy(self) -> bool:
        return self.error is None and not self._stopped and self.core is not None and self.core.is_alive()

    @property
    def accepting(self) -> bool:
        return self.is_healthy and not self.draining

    def stop_admission(self) -> None:
        """New requests get ShuttingDownError from now on; those under way go on."""
        self.draining = True

    def abort_all(self, error: BaseException) -> None:
        """End every request under way with `error`."""
        self._send(msg.Abort(list(self._requests)))
        self._fail_all(error)

    # ---- requests -------------------------------------------------------------------------------

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Run the requests together; yield every RequestOutput as it comes. Leaving the iteration early
        (client gone, cancelled, closed) aborts the unfinished requests."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down and takes no new requests")
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        call = _Call(asyncio.Queue(), time.monotonic())
        for r in requests:
            if r.request_id in self._requests:
                raise ValueError(f"request id {r.request_id!r} is already in use")
        for r in requests:
            self._requests[r.request_id] = (call, _RequestState(r, self.tokenizer))
        self._send(msg.AddCall([msg.NewRequest(r.request_id, r.prompt_token_ids, msg.pack_params(r.params))
                                for r in requests]))
        self.num_in_flight += 1
        unfinished = {r.request_id for r in requests}
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
            left = [rid for rid in unfinished if self._requests.get(rid, (None,))[0] is call]
            for rid in left:
                self._finished(rid, "abort")
            if left:
                self._send(msg.Abort(left))

    def _send(self, m) -> None:
        """Send in order, never blocking the event loop. A PUSH socket refuses a message (EAGAIN) while no core
        is connected: connecting is asynchronous, so the first requests can come before the core's socket is
        there. Such messages wait here and are retried every SEND_RETRY_S; dropping them would leave their
        requests waiting for ever."""
        self._unsent.append(msg.encoder.encode(m))
        self._flush()

    def _flush(self) -> None:
        while self._unsent:
            if self.error is not None or self._stopped:  # the core is gone: its requests have failed already
                self._unsent.clear()
                return
            try:
                self._input.send(self._unsent[0], zmq.NOBLOCK)
            except zmq.Again:
                if not self._retrying:
                    try:
                        asyncio.get_running_loop().call_later(SEND_RETRY_S, self._retry)
                        self._retrying = True
                    except RuntimeError:  # not on the event loop (no caller does this): nothing can retry
                        logger.warning("the engine core took no message; %d dropped", len(self._unsent))
                        self._unsent.clear()
                return
            except zmq.ZMQError as e:  # closed: the server is going down
                logger.warning("could not send to the engine core: %s", e)
                self._unsent.clear()
                return
            self._unsent.popleft()

    def _retry(self) -> None:
        self._retrying = False
        self._flush()

    # ---- outputs --------------------------------------------------------------------------------

    async def _output_loop(self) -> None:
        try:
            while True:
                if not await self._output.poll(CORE_POLL_MS):
                    if not self.core.is_alive():
                        code = self.core.exitcode
                        raise EngineDeadError(f"the engine core exited (exit code {code})" if code is not None
                                              else "the engine core stopped")
                    continue
                m = msg.output_decoder.decode(await self._output.recv())
                if isinstance(m, msg.CoreDead):
                    raise EngineDeadError(m.error)
                self._on_step(m)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - the core is gone: nothing can run any more
            if self._stopped:
                return
            logger.critical("the engine core failed: %s", e)
            self.error = e if isinstance(e, EngineDeadError) else EngineDeadError(repr(e))
            self._fail_all(self.error)
            if self.on_fatal is not None:
                self.on_fatal()

    def _on_step(self, m: msg.StepOutputs) -> None:
        aborts = []
        for t in m.outputs:
            entry = self._requests.get(t.request_id)
            if entry is None:
                continue  # aborted or stopped here; the core had not heard yet
            call, state = entry
            rid = t.request_id
            if t.finish_reason == "error":
                self._finished(rid, "error")
                call.put(ValueError(t.error) if t.invalid else
                         RequestFailedError(f"request {rid} failed in the engine: {t.error}"))
                continue
            try:
                out = state.advance(t)
            except Exception as e:  # noqa: BLE001 - detokenising this request: it fails alone
                logger.error("request %s failed: %s: %s", rid, type(e).__name__, e, exc_info=e)
                self._finished(rid, "error")
                aborts.append(rid)
                call.put(RequestFailedError(f"request {rid} failed in the engine: {type(e).__name__}: {e}"))
                continue
            if state.finished:
                self._finished(rid, state.finish_reason)
                if t.finish_reason is None:  # a stop string: the core does not know yet
                    aborts.append(rid)
            if out is None:
                continue
            if not call.first_token_seen and out.outputs[0].token_ids:
                call.first_token_seen = True
                self.metrics.on_first_token(time.monotonic() - call.arrival)
            call.put(out)
        if aborts:
            self._send(msg.Abort(aborts))
        self.metrics.update_gauges(m.gauges)

    def _finished(self, request_id: str, reason: str | None) -> None:
        call, _ = self._requests.pop(request_id)
        self.metrics.on_finish(reason, time.monotonic() - call.arrival)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._requests):
            call, _ = self._requests[rid]
            self._finished(rid, "abort")
            call.put(error)
