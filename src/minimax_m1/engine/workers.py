"""One process per rank for tensor/expert parallelism: rank 0 is the process that builds the engine (it
schedules and samples); ranks 1..N-1 are spawned here and run the same model runner on the step inputs rank 0
sends them through the StepChannel (step_channel.py).

Start-up: every rank joins the process group, builds its share of the model, then the ranks agree (through
`RankLink`, a pipe to each worker: a handful of small messages, not step traffic) on one cache plan, the
smallest every rank's memory holds, and capture their decode CUDA graphs together, collectives inside.

Failure, in bounded time and with no process left behind:
- a worker that dies: a monitor thread on rank 0 waits on the workers' sentinels; the next step (or the one
  under way, whose collective fails with the dead peer; NCCL's is aborted) raises ParallelFailure naming the
  rank and its exit code or signal, and the other workers are stopped;
- a step that fails on rank 0 or a collective that hangs (the process group's timeout) does the same: the ranks
  are out of step and cannot go on;
- rank 0 that dies: each worker watches its parent and exits.
ParallelFailure is an EngineFatalError, so the server exits (non-zero) rather than retrying the step.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref

import torch

from .. import distributed
from ..config import UserError
from .llm_engine import EngineFatalError
from .step_channel import STOP, Capacity, ChannelClosed, ChannelTimeout, StepChannel

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0  # a worker told to stop gets this long to exit before it is killed


class ParallelFailure(EngineFatalError):
    """A rank died, a step failed on one rank, or a collective timed out: the ranks are out of step."""


def rank_device(device: torch.device, rank: int, backend: str) -> torch.device:
    """Rank r's device: the r-th GPU from args.device's index (gloo: round robin, several ranks may share one,
    for tests; NCCL refuses that, EngineArgs checks the count)."""
    if device.type != "cuda":
        return device
    index = (device.index or 0) + rank
    return torch.device("cuda", index % torch.cuda.device_count() if backend == "gloo" else index)


class RankLink:
    """Start-up agreement between the ranks: rank 0 holds a pipe to each worker, a worker its pipe to rank 0.
    At world size 1 every call returns at once."""

    def __init__(self, rank: int = 0, conns=(), procs=()):
        self.rank, self.conns, self.procs = rank, list(conns), list(procs)

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks, on every rank (also a barrier)."""
        if self.rank == 0:
            values = [value] + [self._recv(r) for r in range(1, len(self.conns) + 1)]
            for c in self.conns:
                c.send(("value", min(values)))
            return min(values)
        self.conns[0].send(("value", value))
        return self._recv(0)

    def barrier(self) -> None:
        self.agree_min(0)

    def send_all(self, payload) -> None:
        for c in self.conns:
            c.send(("value", payload))

    def recv(self):
        return self._recv(0)

    def recv_from(self, rank: int):
        return self._recv(rank)

    def _recv(self, rank: int):
        """The next value from `rank` (a worker's: from rank 0), raising ParallelFailure when it reports an error
        or dies first (rank 0 on a worker: its parent gone)."""
        conn = self.conns[rank - 1 if self.rank == 0 else 0]
        while not conn.poll(0.1):
            if self.rank == 0:
                proc = self.procs[rank - 1]
                if not proc.is_alive() and not conn.poll(0):
                    raise ParallelFailure(f"rank {rank} {_exit_text(proc.exitcode)} while starting")
            elif os.getppid() != _parent_pid:
                raise ParallelFailure("rank 0 exited")
        try:
            kind, payload = conn.recv()
        except EOFError:
            raise ParallelFailure(f"rank {rank} closed its pipe while starting") from None
        if kind == "error":
            raise ParallelFailure(f"rank {rank} failed while starting: {payload}")
        return payload


SINGLE_LINK = RankLink()
_parent_pid = os.getppid()


class Workers:
    """Ranks 1..N-1 of an N-rank engine, seen from rank 0. Constructing it spawns them and makes this process
    rank 0 of the process group; open_channel() once the cache plan is known; run() each step; shutdown() at
    the end (also on garbage collection and at exit)."""

    def __init__(self, args, world_size: int, backend: str, timeout_s: float):
        from .builder import worker_args  # the builder owns EngineArgs

        self.world_size, self.backend, self.timeout_s = world_size, backend, timeout_s
        self.failure: str | None = None
        # called (on the monitor thread, with the failure text) when a worker dies: a server that is idle hears
        # of it at once instead of at its next step
        self.on_failure: list = []
        self.channel: StepChannel | None = None
        self._dir = tempfile.mkdtemp(prefix="minimax-m1-ranks-")
        init_method = f"file://{os.path.join(self._dir, 'rendezvous')}"
        ctx = mp.get_context("spawn")  # CUDA and threads do not survive fork
        self.procs, conns = [], []
        distributed.multi_gpu_env()  # inherited by every worker (they set it again themselves)
        for rank in range(1, world_size):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=worker_main, name=f"minimax-m1-rank{rank}", daemon=True,
                            args=(worker_args(args, rank, backend), rank, world_size, backend, init_method, timeout_s,
                                  theirs, os.getpid()))
            p.start()
            theirs.close()
            self.procs.append(p)
            conns.append(ours)
        self.link = RankLink(0, conns, self.procs)
        self._finalizer = weakref.finalize(self, _stop_all, self.procs, conns, [], self._dir)
        self._stopping = False
        # before multiprocessing's own exit hook (atexit runs hooks last-in first-out), which would terminate the
        # workers unasked; a weak reference, so that the hook keeps nothing alive
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        self._monitor = threading.Thread(target=self._watch, name="minimax-m1-rank-monitor", daemon=True)
        self._monitor.start()
        try:
            device = rank_device(torch.device(args.device), 0, backend)
            if backend == "nccl":
                os.environ["LOCAL_RANK"] = str(device.index)  # init_distributed picks the GPU from it
            for rank in range(1, world_size):  # each has started (imports take seconds): the join is quick
                self.link.recv_from(rank)
            self.group = distributed.init_distributed(0, world_size, backend, init_method, timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # ---- steps --------------------------------------------------------------------------------

    def open_channel(self, capacity: Capacity) -> None:
        self.channel = StepChannel.create(capacity, self.world_size - 1)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop_all, self.procs, self.link.conns, [self.channel], self._dir)
        self.link.send_all((self.channel.name, capacity))

    def run(self, runner, inputs, graph: bool):
        """Send the step to every rank, run rank 0's share; a failure anywhere stops all ranks (ParallelFailure)."""
        if self._stopping:
            raise ParallelFailure(f"{self.failure or 'the parallel engine was shut down'}: it runs no more steps")
        pool = runner.cache.state_pool
        fresh, pool.fresh = pool.fresh, []
        try:
            self.channel.send_step(inputs, graph, fresh, should_stop=lambda: self.failure, timeout_s=self.timeout_s)
        except (ChannelClosed, ChannelTimeout) as e:
            self._fail(e)
        try:
            return runner.execute(inputs, graph)
        except Exception as e:  # noqa: BLE001 - the other ranks are inside this step: nothing can resume it
            self._fail(e)

    def _fail(self, error: BaseException):
        deadline = time.monotonic() + 5.0  # a collective that failed with a dead peer: let the monitor see it
        while self.failure is None and time.monotonic() < deadline and all(p.is_alive() for p in self.procs):
            time.sleep(0.05)
        if self.failure is None and not all(p.is_alive() for p in self.procs):
            time.sleep(0.2)
        text = f"{type(error).__name__}: {error}"
        if self.failure:
            why = self.failure
        elif "timed out" in text.lower() or "timeout" in text.lower():
            why = (f"a collective on rank 0 waited longer than collective_timeout_s={self.timeout_s:g} s: another "
                   f"rank hangs ({text})")
        else:
            why = f"a step failed on rank 0 ({text})"
        self.shutdown()
        raise ParallelFailure(f"{why}; the {self.world_size} ranks cannot go on: the engine stops") from error

    # ---- watching and stopping ----------------------------------------------------------------

    def _watch(self) -> None:
        alive = {p.sentinel: (r, p) for r, p in enumerate(self.procs, 1)}
        while alive and not self._stopping:
            for s in mp.connection.wait(list(alive), timeout=0.5):
                rank, proc = alive.pop(s)
                proc.join(2.0)  # the sentinel fires at exit; reaping it (the exit code) can lag a moment
                if self._stopping or proc.exitcode == 0:
                    continue
                detail = _last_error(self.link.conns[rank - 1])
                self.failure = f"rank {rank} (pid {proc.pid}) {_exit_text(proc.exitcode)}" + (
                    f": {detail}" if detail else "")
                logger.error("%s; the engine stops", self.failure)
                for callback in self.on_failure:
                    try:
                        callback(self.failure)
                    except Exception:  # noqa: BLE001
                        logger.exception("a worker-failure callback failed")
                if self.backend == "nccl":  # rank 0 may wait inside a collective with the dead rank: end it
                    try:
                        torch.distributed.distributed_c10d._abort_process_group()  # noqa: SLF001
                    except Exception:  # noqa: BLE001
                        logger.exception("aborting the NCCL process group failed")
                return

    def shutdown(self) -> None:
        """Stop every worker (asked first, killed after JOIN_TIMEOUT_S), then leave the process group."""
        if self._stopping:
            return
        self._stopping = True
        if self.channel is not None and self.failure is None:
            try:
                self.channel.send_stop(should_stop=lambda: self.failure, timeout_s=1.0)
            except Exception:  # noqa: BLE001 - a worker that cannot take it is killed below
                pass
        self._finalizer()
        if self.failure is None:
            distributed.destroy_distributed()
        else:  # a dead peer: leave the group without waiting on it
            try:
                torch.distributed.distributed_c10d._abort_process_group()  # noqa: SLF001
            except Exception:  # noqa: BLE001
                pass
            distributed.destroy_distributed()


def _shutdown_at_exit(ref) -> None:
    workers = ref()
    if workers is not None:
        workers.shutdown()


def _stop_all(procs, conns, channels, tmpdir) -> None:
    """Join the workers (they exit on STOP or on their parent's exit), killing those that do not; free the rest."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()
    for c in conns:
        c.close()
    for ch in channels:
        ch.close()
    shutil.rmtree(tmpdir, ignore_errors=True)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(conn) -> str | None:
    """The error a dying worker sent, if it got to send one."""
    text = None
    try:
        while conn.poll(0):
            kind, payload = conn.recv()
            if kind == "error":
                text = payload
    except (EOFError, OSError):
        pass
    return text


# ---- the worker process ------------------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    """Exit at once when rank 0 is gone, whatever this process is waiting on (a collective, the channel)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="minimax-m1-parent-watch", daemon=True).start()


def worker_main(args, rank: int, world_size: int, backend: str, init_method: str, timeout_s: float, conn,
                parent_pid: int) -> None:
    """Rank `rank`: join the group, build the same runner as rank 0, then run every step rank 0 sends."""
    global _parent_pid
    _parent_pid = parent_pid
    distributed.multi_gpu_env()
    _watch_parent(parent_pid)
    from .builder import build_runner, load_model

    link = RankLink(rank, [conn])
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            os.environ["LOCAL_RANK"] = str(device.index)
        conn.send(("value", "joining"))  # rank 0 joins once every rank is this far
        distributed.init_distributed(rank, world_size, backend, init_method, timeout_s)
        parallel = args.parallel_config()
        config, model, _, _ = load_model(args, parallel)
        runner, _ = build_runner(config, model, args, parallel, link)
        name, capacity = link.recv()
        channel = StepChannel.attach(name, capacity, world_size - 1, rank - 1)
        states = runner.cache.state_pool.states
        pin = device.type == "cuda"
        stop = lambda: None if os.getppid() == parent_pid else "rank 0 exited"  # noqa: E731
        with torch.inference_mode():
            while True:
                msg = channel.recv(should_stop=stop, pin=pin)
                if msg.kind == STOP:
                    break
                if msg.fresh_slots:  # rank 0 zeroed these when it handed them out
                    states[:, msg.fresh_slots] = 0  # (indexing with a list copies: assign, not zero_)
                runner.execute(msg.inputs, msg.graph)
        channel.close()
    except BaseException as e:  # noqa: BLE001 - tell rank 0 what happened, then exit non-zero
        text = f"{type(e).__name__}: {e}"
        if not isinstance(e, UserError):  # a user's mistake rank 0 reports in one line; a fault with its traceback
            logger.error("rank %d failed: %s\n%s", rank, text, traceback.format_exc())
        try:
            conn.send(("error", text))
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)
    distributed.destroy_distributed()
