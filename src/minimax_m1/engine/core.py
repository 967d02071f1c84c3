"""The engine core: the scheduler and model runner behind the API server, in a process of their own (or a
thread, for tests and embedding), fed over ZeroMQ (messages.py). The HTTP side tokenises, detokenises and
checks stop strings; the core runs one loop: take what arrived, admit, step, send the step's outputs in one
message. It never waits on the HTTP side: sends are queued by ZeroMQ (no high-water mark), and when there is
work the inputs are only polled.

Admission is round-robin between client requests: the core keeps each call's engine requests (its prompts
x n) in a queue of its own and gives the engine one from each call in turn, only as many as the engine has
sequence slots, so a request of 256 sequences does not make a small one wait behind it.

Faults: a request that fails inside the engine fails alone (finish_reason "error"); a step that raises
fails the requests in the engine and the engine goes on; MAX_FAILED_STEPS failures in a row, or a failed
device, stop the core for good: it sends CoreDead and exits (the server then fails its requests, answers
503 and exits non-zero, for its supervisor to restart it).

Lifecycle of the process: it dies with its parent (PR_SET_PDEATHSIG, and a check of the parent between
turns), ignores SIGINT/SIGTERM (the server drains and then sends Shutdown), and reports the built engine's
limits, or why it could not build one, through a pipe before it serves."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time

import zmq

from . import messages as msg
from .llm_engine import EngineFatalError, LLMEngine
from .report import ThroughputLog, engine_summary

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3
TIME_LIMIT = "max_request_seconds"  # the stop_reason of a request cut off by the time limit
IDLE_POLL_MS = 500  # how often an idle core looks at its parent


@dataclasses.dataclass(eq=False)
class _Call:
    """The engine requests of one AddCall that the engine has not finished."""
    arrival: float
    pending: collections.deque  # NewRequests not yet given to the engine
    unfinished: set[str]


class EngineCore:
    def __init__(self, engine: LLMEngine, input_addr: str, output_addr: str,
                 max_request_seconds: float | None = None, parent_pid: int | None = None):
        self.engine = engine
        self.max_request_seconds = max_request_seconds
        self.parent_pid = parent_pid
        self._slots = engine.scheduler.max_num_seqs  # engine requests admitted at once
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PULL)
        self._input.connect(input_addr)
        self._output = self._ctx.socket(zmq.PUSH)
        self._output.setsockopt(zmq.SNDHWM, 0)  # never block the loop on a slow reader
        self._output.setsockopt(zmq.LINGER, 1000)
        self._output.connect(output_addr)
        self._queue: collections.deque[_Call] = collections.deque()  # calls with pending requests, in turn
        self._calls: dict[str, _Call] = {}  # by the id of each of their unfinished requests
        self._in_engine: set[str] = set()
        self._by_arrival: collections.deque[_Call] = collections.deque()  # for the time limit
        self._outputs: list[msg.TokenOutput] = []
        self._failed_steps = 0
        self._stopping = False
        self._throughput = ThroughputLog()
        # a parallel engine's workers (engine/workers.py): a worker that dies while the core is idle ends the core
        # within IDLE_POLL_MS, not at the next request's step
        self._peer_failure: str | None = None
        peers = getattr(engine.runner, "peers", None)
        if peers is not None:
            peers.on_failure.append(self._on_peer_failure)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until Shutdown (0) or a fatal error (1)."""
        try:
            while not self._stopping:
                busy = bool(self._queue) or self.engine.has_unfinished()
                got = self._receive(block=not busy)
                if self._stopping:
                    break
                self._expire()
                self._admit()
                stepped = self.engine.has_unfinished()
                if stepped:
                    self._step()
                    self._throughput.maybe_log(self.engine, sum(len(c.pending) for c in self._queue))
                if got or stepped or self._outputs:
                    self._send()
            return 0
        except BaseException as e:  # a failed device, or the engine could not be cleared after a failure
            logger.critical("the engine failed and cannot go on: %s: %s", type(e).__name__, e, exc_info=e)
            with contextlib.suppress(Exception):
                self._output.send(msg.encoder.encode(msg.CoreDead(f"{type(e).__name__}: {e}")))
            return 1
        finally:
            self._abort_everything()
            self._input.close(linger=0)
            self._output.close()
            self._ctx.term()

    def _on_peer_failure(self, why: str) -> None:  # on the workers' monitor thread
        self._peer_failure = why

    def _receive(self, block: bool) -> bool:
        """Apply every message waiting; when block, first wait for one (looking at the parent and the parallel
        workers meanwhile)."""
        got = False
        while True:
            if self._peer_failure is not None:
                raise EngineFatalError(self._peer_failure)
            if block and not got:
                if not self._input.poll(IDLE_POLL_MS):
                    if self._parent_gone():
                        self._stopping = True
                        return got
                    continue
            try:
                data = self._input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return got
            got = True
            self._apply(msg.input_decoder.decode(data))
            if self._stopping:
                return got

    def _apply(self, m) -> None:
        if isinstance(m, msg.AddCall):
            call = _Call(time.monotonic(), collections.deque(m.requests), {r.request_id for r in m.requests})
            for rid in call.unfinished:
                self._calls[rid] = call
            self._queue.append(call)
            if self.max_request_seconds is not None:
                self._by_arrival.append(call)
        elif isinstance(m, msg.Abort):
            for rid in m.request_ids:
                self._abort(rid)
        elif isinstance(m, msg.Shutdown):
            self._stopping = True

    def _parent_gone(self) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.warning("the server process is gone: the engine core exits")
            return True
        return False

    def _send(self) -> None:
        e = self.engine
        usage = e.cache.usage()
        gauges = msg.Gauges(len(e.scheduler.running), len(e.scheduler.waiting) + sum(len(c.pending) for c in self._queue),
                            usage.state_slots, usage.kv_blocks, e.num_prompt_tokens, e.num_generated_tokens,
                            e.scheduler.num_preemptions)
        outputs, self._outputs = self._outputs, []
        self._output.send(msg.encoder.encode(msg.StepOutputs(outputs, gauges)))

    # ---- admission, steps, ends ------------------------------------------------------------------

    def _admit(self) -> None:
        """Give the engine one pending request from each call in turn while it has free sequence slots."""
        while self._queue and len(self._in_engine) < self._slots:
            call = self._queue.popleft()
            req = call.pending.popleft()
            try:
                params = msg.unpack_params(req.params)
                # the server detokenises and checks stop strings; the core sends every token as it comes
                params = dataclasses.replace(params, output_kind="delta")
                self.engine.add_request(req.request_id, req.prompt_token_ids, params, detokenize=False)
            except Exception as e:  # noqa: BLE001 - the server validates first; a bad request must not stop the engine
                self._end(req.request_id, msg.TokenOutput(req.request_id, [], finish_reason="error",
                                                          error=str(e), invalid=isinstance(e, ValueError)))
                self._drop_pending(call)
                continue
            self._in_engine.add(req.request_id)
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
            for rid in list(self._in_engine):
                self.engine.abort_request(rid)
                self._end(rid, msg.TokenOutput(rid, [], finish_reason="error",
                                               error=f"failed in an engine step: {type(e).__name__}: {e}"))
            if self.engine.has_unfinished() or self.engine.requests:
                raise EngineFatalError("the engine still holds requests after failing them all") from e
            return
        self._failed_steps = 0
        for out in outputs:
            self._collect(out)

    def _collect(self, out) -> None:
        o = out.outputs[0]
        t = msg.TokenOutput(out.request_id, o.token_ids, o.logprobs, o.finish_reason, o.stop_reason, o.error,
                            prompt_logprobs=out.prompt_logprobs)
        if out.finished:
            self._end(out.request_id, t)
        elif out.request_id in self._calls:
            self._outputs.append(t)

    def _end(self, request_id: str, output: msg.TokenOutput | None) -> None:
        """The request is done here: send its last output (None: the server knows already, an abort)."""
        self._in_engine.discard(request_id)
        call = self._calls.pop(request_id, None)
        if call is None:
            return
        call.unfinished.discard(request_id)
        if output is not None:
            self._outputs.append(output)

    def _expire(self) -> None:
        """Finish the requests of calls past --max-request-seconds: finish_reason "length", stop_reason
        TIME_LIMIT, with what they generated so far."""
        if self.max_request_seconds is None:
            return
        start = time.monotonic() - self.max_request_seconds
        while self._by_arrival and (not self._by_arrival[0].unfinished or self._by_arrival[0].arrival <= start):
            call = self._by_arrival.popleft()
            for req in list(call.pending):
                self._end(req.request_id, msg.TokenOutput(req.request_id, [], finish_reason="length",
                                                          stop_reason=TIME_LIMIT))
            self._drop_pending(call)
            for rid in [r for r in call.unfinished if r in self._in_engine]:
                out = self.engine.finish_request(rid, "length", TIME_LIMIT)
                if out is not None:
                    self._collect(out)

    def _drop_pending(self, call: _Call) -> None:
        """Take the call's requests the engine has not seen out of the queue (the server is told nothing)."""
        if call.pending:
            with contextlib.suppress(ValueError):  # not queued while _admit holds it
                self._queue.remove(call)
        for req in call.pending:
            self._end(req.request_id, None)
        call.pending.clear()

    def _abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is None:
            return
        if request_id in self._in_engine:
            self.engine.abort_request(request_id)
        else:
            call.pending = collections.deque(r for r in call.pending if r.request_id != request_id)
            if not call.pending:
                with contextlib.suppress(ValueError):
                    self._queue.remove(call)
        self._end(request_id, None)

    def _abort_everything(self) -> None:
        for rid in list(self._in_engine):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - a broken engine: the requests are lost either way
                logger.exception("aborting %s failed", rid)
        self._in_engine.clear()
        self._calls.clear()
        self._queue.clear()
        self._by_arrival.clear()


# ---- hosting the core: a thread (an engine built by the caller) or a process of its own ------------


def ready_info(engine: LLMEngine) -> msg.Ready:
    return msg.Ready(engine.max_model_len, engine.vocab_size, engine.scheduler.max_num_seqs, engine_summary(engine),
                     sorted(engine.eos_token_ids))


class CoreThread:
    """The core over an engine the caller built, in a thread of this process (tests patch its engine)."""

    def __init__(self, engine: LLMEngine, input_addr: str, output_addr: str, max_request_seconds: float | None):
        self.pid = os.getpid()
        self.exitcode: int | None = None
        core = EngineCore(engine, input_addr, output_addr, max_request_seconds)
        self._thread = threading.Thread(target=self._run, args=(core,), name="minimax-m1-engine-core", daemon=True)
        self._thread.start()

    def _run(self, core: EngineCore) -> None:
        self.exitcode = core.run()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def kill(self) -> None:  # a thread cannot be killed: it ends at Shutdown
        pass


class CoreProcess:
    """The core in a process of its own (spawned: no CUDA state or threads inherited), which builds the
    engine from EngineArgs as `build_engine` does, and so becomes rank 0 of any parallel workers."""

    def __init__(self, engine_args, input_addr: str, output_addr: str, max_request_seconds: float | None,
                 log_level: int = logging.INFO):
        ctx = multiprocessing.get_context("spawn")
        self._ready, child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_core_main, name="minimax-m1-engine-core", daemon=False,
                                 args=(engine_args, input_addr, output_addr, max_request_seconds, os.getpid(),
                                       child_end, log_level))
        self._proc.start()
        child_end.close()
        self.pid = self._proc.pid

    def wait_ready(self, timeout: float | None = None) -> msg.Ready:
        """The built engine's limits; raises what building it raised, or RuntimeError if the process died."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.poll(0.2):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine core process exited (code {self._proc.exitcode}) before it was ready")
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the engine core was not ready within {timeout:g} s")
        try:
            kind, value = self._ready.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine core process exited (code {self._proc.exitcode}) before it was ready") \
                from None
        if kind == "error":
            self._proc.join(10)
            raise value
        return value

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def join(self, timeout: float) -> None:
        self._proc.join(timeout)

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the process that started it dies (Linux), and exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(0)


def _core_main(engine_args, input_addr, output_addr, max_request_seconds, parent_pid, ready, log_level) -> None:
    _die_with_parent(parent_pid)
    # the server handles the signals: it drains, then sends Shutdown (a terminal's ^C reaches us too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    from .builder import build_engine

    try:
        engine = build_engine(engine_args)
        core = EngineCore(engine, input_addr, output_addr, max_request_seconds, parent_pid)
    except BaseException as e:  # noqa: BLE001 - told to the server, which reports it
        try:
            ready.send(("error", e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            ready.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
        ready.close()
        os._exit(1)
    ready.send(("ready", ready_info(engine)))
    ready.close()
    logger.info("engine core ready (pid %d)", os.getpid())
    code = core.run()
    try:
        engine.shutdown()  # the other ranks stop now, told so, rather than finding rank 0 gone
    except Exception:  # noqa: BLE001 - exiting either way; the workers also exit when rank 0 is gone
        logger.exception("stopping the parallel workers failed")
    logging.shutdown()
    os._exit(code)  # no interpreter teardown: nothing is left to flush, and CUDA teardown can hang
