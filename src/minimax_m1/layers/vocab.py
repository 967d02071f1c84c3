"""The token embedding and the output head, split over the vocabulary.

Rank r holds rows [r*P, min(V, (r+1)*P)) of the [V, hidden] table, P = ceil(V/N) (MiniMax-M1: 200064 = 8 x
25008, so no padding at N = 8). When N does not divide V the last rank's table has P rows anyway; its rows
past V (the padded tail) stay zero, are never loaded, never looked up, and their logits are cut off after
the gather, so the result is exactly the unsplit model's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import SINGLE, Group
from ..ops import gemv
from .linear import Plan, box, set_load_plan


class _VocabShard(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, group: Group):
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        self.rows_per_rank = -(-vocab_size // group.world_size)
        self.start = min(vocab_size, group.rank * self.rows_per_rank)
        self.end = min(vocab_size, self.start + self.rows_per_rank)  # this rank's rows [start, end) of the table
        self.weight = set_load_plan(nn.Parameter(torch.empty(self.rows_per_rank, hidden_size)), self._plan)
        if self.end - self.start < self.rows_per_rank and self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight[self.end - self.start:].zero_()

    def _plan(self, shard_id) -> Plan:
        assert shard_id is None, shard_id
        hidden = self.weight.shape[1]
        n = self.end - self.start
        pieces = [(box((self.start, self.end), (0, hidden)), box((0, n), (0, hidden)))] if n else []
        return (self.vocab_size, hidden), pieces


class VocabParallelEmbedding(_VocabShard):
    """ids [T] int64 -> [T, hidden]: each rank looks up the ids in its rows (zeros for the others'), one
    all-reduce sums them (exact: one nonzero term per token)."""

    def __init__(self, vocab_size: int, hidden_size: int, group: Group = SINGLE):
        super().__init__(vocab_size, hidden_size, group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        h = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        return self.group.all_reduce(torch.where(mine.unsqueeze(-1), h, 0))


class ParallelLMHead(_VocabShard):
    """hidden [R, hidden] -> fp32 logits [R, V] on rank 0 (the rank that samples), None on the others: each
    rank computes its rows' logits in the weight's dtype, then they are gathered in fp32. In emulation (no
    collectives) this rank's own logits [R, end - start]."""

    def __init__(self, vocab_size: int, hidden_size: int, group: Group = SINGLE):
        super().__init__(vocab_size, hidden_size, group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        logits = gemv.linear(hidden.to(w.dtype), w).float()
        if self.group.world_size == 1:
            return logits
        if not self.group.communicates:
            return logits[:, : self.end - self.start]
        logits = self.group.gather(logits, dim=-1)
        return None if logits is None else logits[:, : self.vocab_size]
