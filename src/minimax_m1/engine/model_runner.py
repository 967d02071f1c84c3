"""Turns scheduled chunks into one packed model step (eager, or replayed from a CUDA graph), returns
next-token logits, and samples from them."""
from __future__ import annotations

import torch

from ..forward_batch import ForwardBatch
from ..layers.sampler import SamplingBatch, sample, sample_tokens
from .cache import CacheManager
from .constraints import build_logit_constraints
from .cuda_graph import DecodeGraphs
from .scheduler import ScheduledChunk
from .sequence import Sequence
from .step_ahead import StepAhead
from .step_inputs import StepInputs, StepShape


class ModelRunner:
    def __init__(self, model, cache: CacheManager, device):
        self.model, self.device = model, torch.device(device)
        self.cache = cache
        self.graphs: DecodeGraphs | None = None
        self.peers = None  # rank 0 of several: the other ranks (workers.Workers), sent every step
        # async scheduling: the next step's inputs prepared while this one runs (on by default where steps
        # run asynchronously, on CUDA; see step_ahead.py)
        self.ahead: StepAhead | None = StepAhead(self) if self.device.type == "cuda" else None

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        cfg = self.model.config
        if cfg.softmax_layers:  # the ops' workspaces must exist before capture
            from .. import ops

            ops.reserve_workspaces(self.cache.caches.kv[0], self.model.num_q_heads, max_batch, max_model_len)
        self.graphs = DecodeGraphs(self._forward, lambda n: self.prepare_inputs([], pad_to=n), max_batch,
                                   self.cache.blocks_needed(max_model_len), max_model_len, self.cache.scratch_block,
                                   self.device)

    def prepare_inputs(self, chunks: list[ScheduledChunk], all_logits: bool = False,
                       pad_to: int | None = None) -> StepInputs:
        """The host side of one step over the chunks: logits for the completing chunks' last tokens, or for
        every token when all_logits. pad_to: add one-token rows up to this many sequences (a graph's size);
        they have no state slot, write their KV into the scratch block and get a logits row (dropped). Block
        tables are padded with the scratch block. O(tokens + sequences x blocks) host work, no device access."""
        bs, scratch = self.cache.block_size, self.cache.scratch_block
        width = max([len(c.seq.blocks) for c in chunks] + [1])
        ids, positions, slot_mapping, logit_rows, cu = [], [], [], [], [0]
        state_slots, seq_lens, context_lens, tables = [], [], [], []
        for c in chunks:
            seq, start, n = c.seq, c.seq.num_computed, c.num_tokens
            blocks = seq.blocks
            ids += seq.token_ids[start:start + n]
            pos = range(start, start + n)
            positions += pos
            slot_mapping += [blocks[p // bs] * bs + p % bs for p in pos]
            cu.append(cu[-1] + n)
            if all_logits:
                logit_rows += range(cu[-2], cu[-1])
            elif c.completes:
                logit_rows.append(cu[-1] - 1)
            state_slots.append(seq.state_slot)
            seq_lens.append(n)
            context_lens.append(start + n)
            tables += blocks
            tables += [scratch] * (width - len(blocks))
        pad = (pad_to or len(chunks)) - len(chunks)
        assert pad >= 0, (pad_to, len(chunks))
        if pad:
            t = cu[-1]
            ids += [0] * pad
            positions += [0] * pad
            slot_mapping += [scratch * bs] * pad
            logit_rows += range(t, t + pad)
            cu += range(t + 1, t + pad + 1)
            state_slots += [-1] * pad
            seq_lens += [1] * pad
            context_lens += [1] * pad
            tables += [scratch] * (width * pad)
        shape = StepShape(num_tokens=len(ids), num_seqs=len(state_slots), num_logits=len(logit_rows), width=width)
        i64, i32 = shape.pack([ids, positions, slot_mapping, logit_rows], [state_slots, context_lens, cu, tables],
                              pin=self.device.type == "cuda")
        return StepInputs(shape, i64, i32, seq_lens, context_lens)

    def _forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(input_ids, batch, self.cache.caches)
        return self.model.compute_logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], all_logits: bool = False,
            device_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One model step over the chunks; returns fp32 logits [R, vocab] for the completing chunks' last
        tokens (R = number of completing chunks), or for every token when all_logits. device_ids: a decode
        step's input tokens as a device tensor [len(chunks)] (async scheduling: the previous step's samples,
        not yet on the host), in place of the chunks' last host tokens (placeholders)."""
        graph = self.graphs is not None and not all_logits and self._graphable(chunks)
        inputs = self._inputs(chunks, all_logits, pad_to=self.graphs.padded_size(len(chunks)) if graph else None)
        assert device_ids is None or (self.peers is None and len(device_ids) == len(chunks)), "one device, decode"
        logits = self.execute(inputs, graph, device_ids) if self.peers is None else self.peers.run(self, inputs, graph)
        if graph:
            logits = logits[:len(chunks)]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        if self.ahead is not None and not all_logits:
            self.ahead.prepare(chunks)  # while the step runs on the device
        return logits

    def execute(self, inputs: StepInputs, graph: bool, device_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run prepared inputs (every rank runs the same ones): replay the graph of their padded size, or eagerly.
        Logits on rank 0, None on the other ranks. device_ids: the first input ids, from the device (run)."""
        if graph:
            return self.graphs.run(inputs, device_ids)
        input_ids, batch = inputs.to_device(self.device)
        if device_ids is not None:
            input_ids[:len(device_ids)].copy_(device_ids)
        return self._forward(input_ids, batch)

    def shutdown(self) -> None:
        if self.peers is not None:
            self.peers.shutdown()

    def _inputs(self, chunks: list[ScheduledChunk], all_logits: bool = False, pad_to: int | None = None) -> StepInputs:
        """The step's inputs: those prepared during the last step when it guessed this one, else fresh."""
        ahead = self.ahead.take(chunks, pad_to) if self.ahead is not None else None  # a guess lives one step
        return ahead if ahead is not None and not all_logits else self.prepare_inputs(chunks, all_logits, pad_to)

    def _graphable(self, chunks) -> bool:
        return (all(c.num_tokens == 1 and c.completes for c in chunks)
                and self.graphs.can_run(len(chunks), max(len(c.seq.blocks) for c in chunks)))

    def prepare_sampling(self, seqs: list[Sequence]) -> SamplingBatch:
        return SamplingBatch.build([s.params for s in seqs], [s.generator for s in seqs],
                                   [s.token_ids for s in seqs], [s.output_token_ids for s in seqs],
                                   build_logit_constraints(seqs, self.model.config.vocab_size))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits [len(seqs), vocab] fp32 -> (next token per sequence, logprobs per sequence or None)."""
        return sample(logits, self.prepare_sampling(seqs))

    def sample_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [len(seqs), vocab] fp32 -> next token per sequence, [len(seqs)] int64 on the device (no sync)."""
        return sample_tokens(logits, self.prepare_sampling(seqs))
