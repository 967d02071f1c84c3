"""Decode steps replayed from CUDA graphs, one graph per batch size; a batch is padded to the next size
(ModelRunner.prepare_inputs: padding rows have no state slot and write their KV into the scratch block)."""
from __future__ import annotations

import logging

import torch

from ..forward_batch import ForwardBatch
from .step_inputs import StepInputs, StepShape

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class StaticInputs:
    """The buffers the graphs read, laid out as the host's StepInputs, so a step fills each with one copy.
    Graph n reads the first n rows of one [max_batch, max_blocks] block table: its columns past a step's
    width keep what an earlier step left there, which no kernel reads (each reads a row's first
    ceil(context_len / block_size) entries)."""

    def __init__(self, max_batch: int, max_blocks: int, scratch_block: int, device):
        widest = StepShape(max_batch, max_batch, max_batch, max_blocks)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.i64 = torch.zeros(widest.i64_layout()[1], dtype=torch.int64, device=device)
        self.i32 = torch.zeros(widest.i32_layout()[1], dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, dtype=torch.int32, device=device)

    def load(self, inputs: StepInputs) -> None:
        """One host-to-device copy per buffer, then the block tables from their staged place in the int32
        buffer into the wider table (a copy on the device, no temporary)."""
        shape = inputs.shape
        n, w = shape.num_seqs, shape.width
        assert shape.num_tokens == shape.num_logits == n <= self.max_batch and w <= self.max_blocks, shape
        self.i64[:inputs.i64.numel()].copy_(inputs.i64, non_blocking=True)
        self.i32[:inputs.i32.numel()].copy_(inputs.i32, non_blocking=True)
        start = shape.i32_layout()[0][3]
        self.block_tables[:n, :w].copy_(self.i32[start:start + n * w].view(n, w))

    def batch(self, n: int, max_model_len: int) -> tuple[torch.Tensor, ForwardBatch]:
        """What graph n reads: n decode rows whose contexts are at most max_model_len; no host lengths."""
        return StepShape(n, n, n, self.max_blocks).batch(
            self.i64, self.i32, self.block_tables[:n], max_seqlen_q=1, context_len_bound=max_model_len,
            is_decode=True, seq_lens=None, context_lens=None)


class DecodeGraphs:
    """forward(input_ids, batch) -> logits captured once per size over StaticInputs; padding(n) gives the
    inputs of n padding rows, which the buffers hold while graph n is captured."""

    def __init__(self, forward, padding, max_batch: int, max_blocks: int, max_model_len: int, scratch_block: int,
                 device):
        self.sizes = capture_sizes(max_batch)
        self.static = StaticInputs(self.sizes[-1], max_blocks, scratch_block, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for n in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
            self.static.load(padding(n))
            input_ids, batch = self.static.batch(n, max_model_len)
            with torch.inference_mode():
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    forward(input_ids, batch)  # warm-up outside capture: lazy initialisation, library handles
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[n] = forward(input_ids, batch)
            self.graphs[n] = graph
        torch.cuda.synchronize(device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, n: int, num_blocks: int) -> bool:
        return n <= self.static.max_batch and num_blocks <= self.static.max_blocks

    def padded_size(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def run(self, inputs: StepInputs, device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: a decode step padded to a captured size (`padded_size`). Returns logits [size, vocab] fp32,
        a view into the graph's output that the next replay overwrites. device_ids: the first rows' input ids
        from a device tensor (async scheduling), copied over the host's placeholders on the device."""
        self.static.load(inputs)
        if device_ids is not None:
            self.static.i64[:len(device_ids)].copy_(device_ids)  # input_ids is the int64 buffer's first section
        self.graphs[inputs.shape.num_seqs].replay()
        return self.logits[inputs.shape.num_seqs]
