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
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        # static inputs, grouped by dtype so that a step fills each group with one copy
        self.i64 = torch.zeros(3, b, **i64)
        self.input_ids, self.positions, self.slot_mapping = self.i64
        self.slot_mapping.fill_(self.scratch_slot)
        self.i32 = torch.ones(2, b, **i32)
        self.state_slots, self.context_lens = self.i32
        self.state_slots.fill_(-1)
        self.block_tables = torch.full((b, max_blocks), scratch_block, **i32)
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
        """Host lists for n decode rows -> logits [n, vocab] fp32 (a view into the graph's output). Padding
        rows (up to the captured size) get no state slot and write their KV into the scratch block. Three
        host-to-device copies per step: the int64 rows, the int32 rows, the block tables."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        i64 = torch.tensor([input_ids + [0] * pad, positions + [0] * pad, slot_mapping + [self.scratch_slot] * pad],
                           dtype=torch.int64, pin_memory=True)
        i32 = torch.tensor([state_slots + [-1] * pad, context_lens + [1] * pad], dtype=torch.int32, pin_memory=True)
        width = len(block_tables[0])
        tables = torch.tensor(block_tables + [[self.scratch_block] * width] * pad, dtype=torch.int32,
                              pin_memory=True)
        self.i64[:, :size].copy_(i64, non_blocking=True)
        self.i32[:, :size].copy_(i32, non_blocking=True)
        self.block_tables[:size, :width].copy_(tables, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:n]
