"""Decode steps replayed from CUDA graphs, one graph per batch size; a batch is padded to the next size
(padded rows: state slot -1, KV written to a scratch block that no request owns)."""
from __future__ import annotations

import logging

import torch

from ..forward_batch import Caches, ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model, caches: Caches, max_batch: int, max_blocks: int, max_model_len: int,
                 scratch_block: int, block_size: int, device):
        self.model, self.caches = model, caches
        self.sizes = capture_sizes(max_batch)
        self.max_batch, self.max_blocks, self.max_model_len = self.sizes[-1], max_blocks, max_model_len
        b = self.max_batch
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(b, **i64)
        self.positions = torch.zeros(b, **i64)
        self.state_slots = torch.full((b,), -1, **i32)
        self.block_tables = torch.full((b, max_blocks), scratch_block, **i32)
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.slot_mapping = torch.full((b,), self.scratch_slot, **i64)
        self.context_lens = torch.ones(b, **i32)
        self.cu_seqlens = torch.arange(b + 1, **i32)
        self.rows = torch.arange(b, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture(device)

    def _batch(self, n: int) -> ForwardBatch:
        return ForwardBatch(
            positions=self.positions[:n], cu_seqlens=self.cu_seqlens[:n + 1], state_slots=self.state_slots[:n],
            block_tables=self.block_tables[:n], slot_mapping=self.slot_mapping[:n],
            context_lens_t=self.context_lens[:n], seq_lens=[1] * n, context_lens=[1] * n, max_seqlen_q=1,
            max_seqlen_k=self.max_model_len, is_decode=True, logits_indices=self.rows[:n])

    @torch.inference_mode()
    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:n], self._batch(n), self.caches)
        return self.model.compute_logits(hidden)

    def _capture(self, device) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for n in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._forward(n)  # warm-up outside capture: lazy initialisation, library handles
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[n] = self._forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize(device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, n: int, num_blocks: int) -> bool:
        return n <= self.max_batch and num_blocks <= self.max_blocks

    def run(self, input_ids, positions, state_slots, block_tables, slot_mapping, context_lens) -> torch.Tensor:
        """Host lists for n decode rows -> logits [n, vocab] fp32 (a view into the graph's output)."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        pinned = dict(dtype=torch.int64, pin_memory=True)
        self.input_ids[:n].copy_(torch.tensor(input_ids, **pinned), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions, **pinned), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.tensor(slot_mapping, **pinned), non_blocking=True)
        self.state_slots[:n].copy_(torch.tensor(state_slots, dtype=torch.int32, pin_memory=True), non_blocking=True)
        self.context_lens[:n].copy_(torch.tensor(context_lens, dtype=torch.int32, pin_memory=True), non_blocking=True)
        tables = torch.tensor(block_tables, dtype=torch.int32, pin_memory=True)
        self.block_tables[:n, : tables.shape[1]].copy_(tables, non_blocking=True)
        # padding rows: no state, KV into the scratch block
        self.state_slots[n:size].fill_(-1)
        self.slot_mapping[n:size].fill_(self.scratch_slot)
        self.context_lens[n:size].fill_(1)
        self.block_tables[n:size].fill_(self.scratch_block)
        self.graphs[size].replay()
        return self.logits[size][:n]
