"""How rank 0 hands each step's inputs to the other ranks: a fixed-size shared-memory ring, one writer (rank 0),
one reader per other rank, raw integer buffers only (no pickles, nothing that grows with the batch).

A message is a StepInputs (the two flat int buffers of step_inputs.py, their StepShape, whether the step replays
a CUDA graph) plus the state slots rank 0 handed out since the last step (StatePool.allocate zeroes a slot on
rank 0; every other rank zeroes the same slots before it runs the step). The host lengths (seq_lens,
context_lens) are not sent: cu_seqlens and context_lens in the int32 buffer give them back.

Layout of the segment: RING slots, each a header of HEADER int64s and two data areas sized for the largest step
(`capacity`), then one int64 per reader: the last message number it has finished copying out.

    header: [number, kind, T, N, R, W, graph, num_fresh]   number 0 = never written; kind 1 step, 2 stop

The writer fills a slot's header and data and only then stores its number (readers wait for that number); it
reuses a slot once every reader's counter has passed the message that was in it. Both wait loops poll a
`should_stop` callback, so a dead peer or a stopping engine ends them with an error instead of a hang.
"""
from __future__ import annotations

import dataclasses
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import torch

from .step_inputs import StepInputs, StepShape

RING = 4
HEADER = 8
STEP, STOP = 1, 2
_HDR = struct.Struct(f"<{HEADER}q")
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier between the data stores and the number that publishes them (taking a lock is one
    on every platform CPython runs on; x86 would keep the stores in order anyway, Arm would not)."""
    with _fence_lock:
        pass


class ChannelClosed(RuntimeError):
    """The other side is gone or stopping (should_stop said so) while this side waited."""


class ChannelTimeout(RuntimeError):
    """The other side took longer than the timeout to write or to read a message."""


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The largest step a channel carries: tokens, sequences, block-table width, fresh state slots."""

    num_tokens: int
    num_seqs: int
    width: int

    def shape(self) -> StepShape:
        return StepShape(self.num_tokens, self.num_seqs, self.num_tokens, self.width)

    @property
    def i64(self) -> int:
        return self.shape().i64_layout()[1]

    @property
    def i32(self) -> int:
        return self.shape().i32_layout()[1] + self.num_seqs  # + the fresh slots


@dataclasses.dataclass
class Message:
    kind: int
    inputs: StepInputs | None = None
    graph: bool = False
    fresh_slots: list[int] = dataclasses.field(default_factory=list)


class StepChannel:
    """create(capacity, num_readers) on rank 0; attach(name, capacity, num_readers, reader) on the others."""

    def __init__(self, shm: shared_memory.SharedMemory, capacity: Capacity, num_readers: int, reader: int | None,
                 owner: bool):
        self.shm, self.capacity, self.num_readers, self.reader, self.owner = shm, capacity, num_readers, reader, owner
        self.slot_bytes = _HDR.size + 8 * capacity.i64 + 4 * capacity.i32
        self._counters_at = RING * self.slot_bytes
        buf = shm.buf
        self._i64 = [torch.frombuffer(buf, dtype=torch.int64, count=capacity.i64,
                                      offset=s * self.slot_bytes + _HDR.size) for s in range(RING)]
        self._i32 = [torch.frombuffer(buf, dtype=torch.int32, count=capacity.i32,
                                      offset=s * self.slot_bytes + _HDR.size + 8 * capacity.i64) for s in range(RING)]
        self.number = 0  # the last message written (writer) or read (reader)

    @staticmethod
    def size(capacity: Capacity, num_readers: int) -> int:
        return RING * (_HDR.size + 8 * capacity.i64 + 4 * capacity.i32) + 8 * num_readers

    @classmethod
    def create(cls, capacity: Capacity, num_readers: int) -> StepChannel:
        shm = shared_memory.SharedMemory(create=True, size=cls.size(capacity, num_readers))
        shm.buf[:] = bytes(len(shm.buf))  # numbers and counters start at 0
        return cls(shm, capacity, num_readers, None, owner=True)

    @classmethod
    def attach(cls, name: str, capacity: Capacity, num_readers: int, reader: int) -> StepChannel:
        # (Python < 3.13 registers the segment with the resource tracker again; the workers share rank 0's
        # tracker, so that is the same entry, removed when rank 0 unlinks it)
        shm = shared_memory.SharedMemory(name=name)
        return cls(shm, capacity, num_readers, reader, owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    # ---- writer -------------------------------------------------------------------------------

    def send_step(self, inputs: StepInputs, graph: bool, fresh_slots: list[int] = (), **wait) -> None:
        shape, cap = inputs.shape, self.capacity
        n64, n32 = inputs.i64.numel(), inputs.i32.numel()
        if (shape.num_tokens > cap.num_tokens or shape.num_seqs > cap.num_seqs or shape.width > cap.width
                or len(fresh_slots) > cap.num_seqs):
            raise ValueError(f"a step of {shape} (and {len(fresh_slots)} new state slots) exceeds the step channel's "
                             f"capacity {cap}")
        slot = self._claim(**wait)
        self._i64[slot][:n64].copy_(inputs.i64)
        self._i32[slot][:n32].copy_(inputs.i32)
        if fresh_slots:
            self._i32[slot][n32:n32 + len(fresh_slots)] = torch.tensor(list(fresh_slots), dtype=torch.int32)
        self._publish(slot, STEP, shape.num_tokens, shape.num_seqs, shape.num_logits, shape.width, int(graph),
                      len(fresh_slots))

    def send_stop(self, **wait) -> None:
        self._publish(self._claim(**wait), STOP, 0, 0, 0, 0, 0, 0)

    def _claim(self, should_stop: Callable[[], str | None] = lambda: None, timeout_s: float | None = None) -> int:
        """The slot of the next message, once every reader has copied out the message that was in it."""
        number = self.number + 1
        _wait(lambda: min(self._counter(r) for r in range(self.num_readers)) >= number - RING, should_stop,
              timeout_s, "every rank to take the step inputs")
        return number % RING

    def _publish(self, slot: int, *header: int) -> None:
        self.number += 1
        at = slot * self.slot_bytes
        _HDR.pack_into(self.shm.buf, at, 0, *header)
        _fence()
        struct.pack_into("<q", self.shm.buf, at, self.number)

    # ---- reader -------------------------------------------------------------------------------

    def recv(self, should_stop: Callable[[], str | None] = lambda: None, timeout_s: float | None = None,
             pin: bool = False) -> Message:
        """The next message; its buffers are copies (pinned when `pin`), so the slot is free again on return."""
        number = self.number + 1
        slot, at = number % RING, (number % RING) * self.slot_bytes
        _wait(lambda: struct.unpack_from("<q", self.shm.buf, at)[0] == number, should_stop, timeout_s,
              "rank 0's next step")
        _fence()
        _, kind, t, n, r, w, graph, fresh = _HDR.unpack_from(self.shm.buf, at)
        msg = Message(kind)
        if kind == STEP:
            shape = StepShape(t, n, r, w)
            n64, n32 = shape.i64_layout()[1], shape.i32_layout()[1]
            i64 = _copy(self._i64[slot][:n64], pin)
            i32 = _copy(self._i32[slot][:n32], pin)
            msg.fresh_slots = self._i32[slot][n32:n32 + fresh].tolist()
            (_, ctx, cu, _), _ = shape.i32_layout()
            cu_list = i32[cu:cu + n + 1].tolist()
            seq_lens = [b - a for a, b in zip(cu_list, cu_list[1:])]
            msg.inputs = StepInputs(shape, i64, i32, seq_lens, i32[ctx:ctx + n].tolist())
            msg.graph = bool(graph)
        self.number = number
        _fence()
        struct.pack_into("<q", self.shm.buf, self._counters_at + 8 * self.reader, number)
        return msg

    def _counter(self, reader: int) -> int:
        return struct.unpack_from("<q", self.shm.buf, self._counters_at + 8 * reader)[0]

    # ---- end --------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (and, on rank 0, remove) the segment."""
        self._i64 = self._i32 = []  # the views pin the mapping: drop them first
        try:
            self.shm.close()
        except BufferError:  # a view handed out is still alive: the mapping goes when it does
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _copy(view: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(view.shape, dtype=view.dtype, pin_memory=pin)
    return out.copy_(view)


def _wait(ready: Callable[[], bool], should_stop: Callable[[], str | None], timeout_s: float | None,
          what: str) -> None:
    """Poll `ready`: spin (yielding the CPU) for the first millisecond, then sleep in steps growing to 1 ms,
    so that a busy decode loop answers in microseconds and an idle one costs next to nothing."""
    start = time.monotonic()
    pause, checked = 0.0, start
    while not ready():
        now = time.monotonic()
        if now - checked > 0.05:
            checked = now
            why = should_stop()
            if why:
                raise ChannelClosed(why)
            if timeout_s is not None and now - start > timeout_s:
                raise ChannelTimeout(f"waited {timeout_s:.0f} s for {what}")
        if now - start > 1e-3:
            pause = min(1e-3, pause * 2 or 1e-5)
        time.sleep(pause)

