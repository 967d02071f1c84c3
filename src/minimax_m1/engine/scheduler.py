"""Continuous batching: every step, running requests continue (a decode token, or the next chunk of a
long prompt) and waiting requests join while the token budget, state slots and KV blocks allow. Prompt
chunks share the budget round-robin (equal shares, what a short one leaves goes to the others), so one
long prompt does not hold the whole budget while others wait. When KV blocks run out, the youngest
running request is preempted: freed, and recomputed later."""
from __future__ import annotations

import collections
import dataclasses
import itertools

from .cache import CacheManager
from .sequence import Sequence, Status

MIN_PROMPT_CHUNK = 256


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # new tokens computed this step: seq.token_ids[num_computed : num_computed + num_tokens]

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the sequence's last known token, so a next token gets sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self) -> bool:
        """Whether the next schedule() could start a waiting request (a slot and room in the batch)."""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs and self.cache.num_free_slots > 0

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        running = sorted(self.running, key=lambda s: s.arrival)
        share = self._prompt_shares(running)
        # running requests first, oldest first: decode steps and continuing prompt chunks
        for seq in running:
            if seq.status != Status.RUNNING or budget == 0:
                continue
            left = seq.num_tokens - seq.num_computed
            n = min(left, budget, share.get(seq.request_id, 1 if left == 1 else 0))
            if n == 0:
                continue  # a prompt whose turn comes in a later step
            if not self.cache.fits(seq.num_computed + n):
                self.finish(seq, "length")  # longer than the whole KV cache: it can never continue
                continue
            while not self.cache.grow(seq, seq.num_computed + n):
                victim = self._youngest_running(exclude=seq)
                if victim is None:
                    break
                self.preempt(victim)
                chunks = [c for c in chunks if c.seq is not victim]
            else:
                chunks.append(ScheduledChunk(seq, n))
                budget -= n
                continue
            self.preempt(seq)  # nothing left to free: it waits for others to finish
        # admissions, first come first served
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self.cache.num_free_slots:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget, share.get(seq.request_id, 0))
            if n == 0:
                break  # its turn comes in a later step
            if not self.cache.fits(seq.num_tokens):
                self.finish(seq, "length")  # the engine rejects such prompts up front; this is a backstop
                continue
            if not self.cache.allocate(seq, seq.num_computed + n):  # a zeroed state slot and the blocks
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks

    def _prompt_shares(self, running: list[Sequence]) -> dict[str, int]:
        """Request id -> most prompt tokens it may take this step: the budget left after the decodes,
        water-filled over the oldest running prompts and waiting requests that can get a slot, as many as
        get MIN_PROMPT_CHUNK tokens each (a prompt cut finer would cost more than it shares)."""
        prompts = [s for s in running if s.num_tokens - s.num_computed > 1]
        left = self.token_budget - (len(running) - len(prompts))
        free = min(self.cache.num_free_slots, self.max_num_seqs - len(running))
        prompts += itertools.islice(self.waiting, max(free, 0))
        prompts = prompts[:max(1, left // min(MIN_PROMPT_CHUNK, self.token_budget))]
        share = {}
        for k, seq in enumerate(sorted(prompts, key=lambda s: s.num_tokens - s.num_computed)):
            share[seq.request_id] = min(seq.num_tokens - seq.num_computed, max(1, left // (len(prompts) - k)))
            left = max(left - share[seq.request_id], 0)
        return share

    def _youngest_running(self, exclude: Sequence) -> Sequence | None:
        candidates = [s for s in self.running if s is not exclude and s.status == Status.RUNNING]
        return max(candidates, key=lambda s: s.arrival, default=None)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's slot and blocks; it will recompute its prompt and output so far from scratch."""
        self._free(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _free(self, seq: Sequence) -> None:
        self.cache.release(seq)
        if seq in self.running:
            self.running.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        self._free(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
