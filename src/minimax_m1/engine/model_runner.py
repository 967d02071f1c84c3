"""Turns scheduled chunks into one packed model step and returns next-token logits."""
from __future__ import annotations

import torch

from ..forward_batch import Caches, ForwardBatch
from .cuda_graph import DecodeGraphs
from .kv_cache import KVCache
from .scheduler import ScheduledChunk
from .state_pool import StatePool


class ModelRunner:
    def __init__(self, model, state_pool: StatePool, kv_cache: KVCache, device):
        self.model, self.device = model, torch.device(device)
        self.state_pool, self.kv_cache = state_pool, kv_cache
        self.caches = Caches(lightning=state_pool.states, kv=kv_cache.kv)
        self.graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        bs = self.kv_cache.block_size
        cfg = self.model.config
        if cfg.softmax_layers:  # the ops' workspaces must exist before capture
            from .. import ops

            ops.reserve_workspaces(self.caches.kv[0], cfg.num_attention_heads, max_batch, max_model_len)
        self.graphs = DecodeGraphs(self.model, self.caches, max_batch, self.kv_cache.blocks_needed(max_model_len),
                                   max_model_len, self.kv_cache.scratch_block, bs, self.device)

    def build_batch(self, chunks: list[ScheduledChunk], all_logits: bool = False) -> tuple[torch.Tensor, ForwardBatch]:
        bs = self.kv_cache.block_size
        ids, positions, slot_mapping, cu, logit_rows = [], [], [], [0], []
        max_blocks = max((len(c.seq.blocks) for c in chunks), default=0)
        tables = []
        for c in chunks:
            seq, start, n = c.seq, c.seq.num_computed, c.num_tokens
            ids += seq.token_ids[start:start + n]
            pos = range(start, start + n)
            positions += pos
            slot_mapping += [seq.blocks[p // bs] * bs + p % bs for p in pos]
            cu.append(cu[-1] + n)
            tables.append(seq.blocks + [0] * (max_blocks - len(seq.blocks)))
            if all_logits:
                logit_rows += range(cu[-2], cu[-1])
            elif c.completes:
                logit_rows.append(cu[-1] - 1)
        dev = self.device
        seq_lens = [c.num_tokens for c in chunks]
        context_lens = [c.seq.num_computed + c.num_tokens for c in chunks]

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=dev)

        batch = ForwardBatch(
            positions=t(positions, torch.int64),
            cu_seqlens=t(cu, torch.int32),
            state_slots=t([c.seq.state_slot for c in chunks], torch.int32),
            block_tables=t(tables, torch.int32).view(len(chunks), max_blocks),
            slot_mapping=t(slot_mapping, torch.int64),
            context_lens_t=t(context_lens, torch.int32),
            seq_lens=seq_lens,
            context_lens=context_lens,
            max_seqlen_q=max(seq_lens, default=0),
            max_seqlen_k=max(context_lens, default=0),
            is_decode=all(c.num_tokens == 1 for c in chunks),
            logits_indices=t(logit_rows, torch.int64),
        )
        return t(ids, torch.int64), batch

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], all_logits: bool = False) -> torch.Tensor:
        """One model step over the chunks; returns fp32 logits [R, vocab] for the completing chunks' last
        tokens (R = number of completing chunks), or for every token when all_logits."""
        if self.graphs is not None and not all_logits and self._graphable(chunks):
            logits = self._run_graph(chunks)
        else:
            input_ids, batch = self.build_batch(chunks, all_logits)
            hidden = self.model(input_ids, batch, self.caches)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        return logits

    def _graphable(self, chunks) -> bool:
        return (all(c.num_tokens == 1 and c.completes for c in chunks)
                and self.graphs.can_run(len(chunks), max(len(c.seq.blocks) for c in chunks)))

    def _run_graph(self, chunks) -> torch.Tensor:
        bs = self.kv_cache.block_size
        pos = [c.seq.num_computed for c in chunks]
        return self.graphs.run(
            input_ids=[c.seq.token_ids[p] for c, p in zip(chunks, pos)],
            positions=pos,
            state_slots=[c.seq.state_slot for c in chunks],
            block_tables=_pad([c.seq.blocks for c in chunks]),
            slot_mapping=[c.seq.blocks[p // bs] * bs + p % bs for c, p in zip(chunks, pos)],
            context_lens=[p + 1 for p in pos])


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [r[-1]] * (width - len(r)) for r in rows]
