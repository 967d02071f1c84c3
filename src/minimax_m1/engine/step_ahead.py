"""Async scheduling, the host half: while step N runs on the device, prepare the inputs of the step that most
likely follows it (each sequence of step N decoding one more token, oldest first, as the scheduler orders
running requests), so that step N+1 starts without the host's O(sequences x blocks) preparation.

It stays exact by construction: the scheduler still decides step N+1 after step N's tokens are known, and
the prepared inputs are used only when its chunks are exactly the ones guessed: the same sequences in the
same order, each one token on at the guessed position, with the same state slot and blocks. Only what was
unknown is filled in then: the input ids (step N's sampled tokens) and, for a sequence that crossed into a
new KV block, that block's id. Anything else (a sequence finished or preempted, a request admitted, a
prompt chunk) falls back to a fresh preparation."""
from __future__ import annotations

import dataclasses

from ..host_tensors import from_list
from .scheduler import ScheduledChunk
from .step_inputs import StepInputs


class _NextToken:
    """What prepare_inputs reads of a sequence, one decode step on; its new token is not known yet (0)."""
    __slots__ = ("num_computed", "num_tokens", "token_ids", "blocks", "state_slot")

    def __init__(self, position: int, blocks: list[int], state_slot: int):
        self.num_computed, self.num_tokens = position, position + 1
        self.token_ids = _Unknown()
        self.blocks, self.state_slot = blocks, state_slot


class _Unknown:
    def __getitem__(self, s: slice) -> list[int]:
        return [0] * len(range(*s.indices(1 << 62)))


@dataclasses.dataclass
class _Row:
    seq: object
    position: int
    state_slot: int
    num_blocks: int  # the blocks it held when guessed
    new_block: bool  # its position starts a block it did not hold yet


@dataclasses.dataclass
class _Guess:
    rows: list[_Row]
    pad_to: int | None
    inputs: StepInputs


class StepAhead:
    """runner.run calls prepare(chunks) after launching a step and take(chunks, pad_to) before the next;
    hits/misses count how often the guess was used, new_blocks the block ids filled in."""

    def __init__(self, runner):
        self.runner = runner
        self._guess: _Guess | None = None
        self.hits = self.misses = self.new_blocks = 0

    def prepare(self, chunks: list[ScheduledChunk]) -> None:
        """chunks: the step just launched (num_computed already advanced)."""
        self._guess = None
        if not chunks or not all(c.seq.num_computed == c.seq.num_tokens for c in chunks):
            return  # a prompt goes on next step: its chunk size is the scheduler's to choose
        bs, scratch = self.runner.cache.block_size, self.runner.cache.scratch_block
        rows, guessed = [], []
        for seq in sorted((c.seq for c in chunks), key=lambda s: s.arrival):
            p, blocks = seq.num_computed, seq.blocks
            new_block = p // bs >= len(blocks)
            rows.append(_Row(seq, p, seq.state_slot, len(blocks), new_block))
            # a block it will be given: the scratch block stands in for it until then
            guessed.append(ScheduledChunk(_NextToken(p, blocks + [scratch] if new_block else blocks, seq.state_slot), 1))
        graphs = self.runner.graphs
        pad_to = graphs.padded_size(len(guessed)) if graphs is not None and self.runner._graphable(guessed) else None
        self._guess = _Guess(rows, pad_to, self.runner.prepare_inputs(guessed, pad_to=pad_to))

    def take(self, chunks: list[ScheduledChunk], pad_to: int | None) -> StepInputs | None:
        """The prepared inputs if `chunks` are the guessed step (ids and new blocks filled in), else None."""
        guess, self._guess = self._guess, None
        if guess is None:
            return None
        if not self._matches(guess, chunks, pad_to):
            self.misses += 1
            return None
        inputs = guess.inputs
        (ids, _, slots, _), _ = inputs.shape.i64_layout()
        tables = inputs.shape.i32_layout()[0][3]
        n, width, bs = len(chunks), inputs.shape.width, self.runner.cache.block_size
        inputs.i64[ids:ids + n] = from_list([r.seq.token_ids[r.position] for r in guess.rows], inputs.i64.dtype)
        for i, r in enumerate(guess.rows):
            if r.new_block:
                block = r.seq.blocks[r.num_blocks]
                inputs.i64[slots + i] = block * bs + r.position % bs
                inputs.i32[tables + i * width + r.num_blocks] = block
                self.new_blocks += 1
        self.hits += 1
        return inputs

    @staticmethod
    def _matches(guess: _Guess, chunks: list[ScheduledChunk], pad_to: int | None) -> bool:
        if len(chunks) != len(guess.rows) or pad_to != guess.pad_to:
            return False
        for c, r in zip(chunks, guess.rows):
            s = c.seq
            if not (s is r.seq and c.num_tokens == 1 and s.num_computed == r.position and s.num_tokens == r.position + 1
                    and s.state_slot == r.state_slot and len(s.blocks) == r.num_blocks + r.new_block):
                return False
        return True
