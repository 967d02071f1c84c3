"""One step's model inputs as the host prepares them, and their layout. The eager path copies them to the
device, a CUDA graph copies them into its static buffers; both read them through the same views
(`StepShape.batch`). Two flat buffers, one per dtype, so each moves to the device with one copy:

    int64: input_ids [T] | positions [T] | slot_mapping [T] | logits_indices [R]
    int32: state_slots [N] | context_lens [N] | cu_seqlens [N+1] | block_tables [N, W] (row-major)

Each section starts ALIGN elements in (64 bytes of int32, 128 of int64), enough for any vector load."""
from __future__ import annotations

import dataclasses

import torch

from ..forward_batch import ForwardBatch
from ..host_tensors import from_list

ALIGN = 16  # elements


def _starts(lengths: list[int]) -> tuple[list[int], int]:
    """Aligned start of each section, and the end of the last one."""
    starts, end = [], 0
    for n in lengths:
        start = -(-end // ALIGN) * ALIGN
        starts.append(start)
        end = start + n
    return starts, end


@dataclasses.dataclass(frozen=True)
class StepShape:
    num_tokens: int  # T
    num_seqs: int  # N
    num_logits: int  # R
    width: int  # W: block-table columns

    def i64_layout(self) -> tuple[list[int], int]:
        t = self.num_tokens
        return _starts([t, t, t, self.num_logits])

    def i32_layout(self) -> tuple[list[int], int]:
        n = self.num_seqs
        return _starts([n, n, n + 1, n * self.width])

    def pack(self, i64: list[list[int]], i32: list[list[int]], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The host buffers from their sections (lists in the order above)."""
        return (_pack(i64, self.i64_layout()[0], torch.int64, pin),
                _pack(i32, self.i32_layout()[0], torch.int32, pin))

    def batch(self, i64: torch.Tensor, i32: torch.Tensor, block_tables: torch.Tensor | None, *, max_seqlen_q: int,
              context_len_bound: int, is_decode: bool, seq_lens: list[int] | None,
              context_lens: list[int] | None) -> tuple[torch.Tensor, ForwardBatch]:
        """(input_ids [T], ForwardBatch) as views of buffers with this layout (the rest as ForwardBatch has
        them). block_tables: a tensor of its own (a graph's, wider than W), else None: the int32 buffer's
        last section."""
        t, n, r = self.num_tokens, self.num_seqs, self.num_logits
        (ids, pos, slots, rows), _ = self.i64_layout()
        (states, ctx, cu, tables), _ = self.i32_layout()
        if block_tables is None:
            block_tables = i32[tables:tables + n * self.width].view(n, self.width)
        return i64[ids:ids + t], ForwardBatch(
            positions=i64[pos:pos + t], cu_seqlens=i32[cu:cu + n + 1], state_slots=i32[states:states + n],
            block_tables=block_tables, slot_mapping=i64[slots:slots + t], context_lens_t=i32[ctx:ctx + n],
            logits_indices=i64[rows:rows + r], max_seqlen_q=max_seqlen_q, context_len_bound=context_len_bound,
            is_decode=is_decode, seq_lens=seq_lens, context_lens=context_lens)


def _pack(sections: list[list[int]], starts: list[int], dtype, pin: bool) -> torch.Tensor:
    flat: list[int] = []
    for section, start in zip(sections, starts):
        flat += [0] * (start - len(flat))
        flat += section
    return from_list(flat, dtype, pin)


@dataclasses.dataclass
class StepInputs:
    """A step's inputs on the host: the two buffers (pinned when the step runs on CUDA) and every row's
    lengths (padding rows: one new token, a context of one)."""

    shape: StepShape
    i64: torch.Tensor
    i32: torch.Tensor
    seq_lens: list[int]
    context_lens: list[int]

    def to_device(self, device) -> tuple[torch.Tensor, ForwardBatch]:
        """(input_ids, ForwardBatch) on device, for an eager step: one copy per buffer."""
        return self.shape.batch(
            self.i64.to(device, non_blocking=True), self.i32.to(device, non_blocking=True), None,
            max_seqlen_q=max(self.seq_lens, default=0), context_len_bound=max(self.context_lens, default=0),
            is_decode=all(n == 1 for n in self.seq_lens), seq_lens=self.seq_lens, context_lens=self.context_lens)
