"""Turns scheduled chunks into one packed model step and returns next-token logits."""
from __future__ import annotations

import torch

from ..forward_batch import Caches, ForwardBatch
from .kv_cache import KVCache
from .scheduler import ScheduledChunk
from .state_pool import StatePool


class ModelRunner:
    def __init__(self, model, state_pool: StatePool, kv_cache: KVCache, device):
        self.model, self.device = model, torch.device(device)
        self.state_pool, self.kv_cache = state_pool, kv_cache
        self.caches = Caches(lightning=state_pool.states, kv=kv_cache.kv)

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

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=dev)

        batch = ForwardBatch(
            positions=t(positions, torch.int64),
            cu_seqlens=t(cu, torch.int32),
            state_slots=t([c.seq.state_slot for c in chunks], torch.int32),
            block_tables=t(tables, torch.int32).view(len(chunks), max_blocks),
            slot_mapping=t(slot_mapping, torch.int64),
            seq_lens=[c.num_tokens for c in chunks],
            context_lens=[c.seq.num_computed + c.num_tokens for c in chunks],
            is_decode=all(c.num_tokens == 1 for c in chunks),
            logits_indices=t(logit_rows, torch.int64),
        )
        return t(ids, torch.int64), batch

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], all_logits: bool = False) -> torch.Tensor:
        """One model step over the chunks; returns fp32 logits [R, vocab] for the completing chunks' last
        tokens (R = number of completing chunks), or for every token when all_logits."""
        input_ids, batch = self.build_batch(chunks, all_logits)
        hidden = self.model(input_ids, batch, self.caches)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        return logits
