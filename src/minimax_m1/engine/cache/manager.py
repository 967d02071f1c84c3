"""Who holds which lightning state slot and which KV blocks. The scheduler asks here (policy stays in
scheduler.py), the runner reads the tensors and the sequences' allocations; nothing else touches the pools.
Prefix caching lands here too: blocks that several sequences share (KVCache's reference counts) and
lightning-state snapshots at block boundaries (more state slots)."""
from __future__ import annotations

import dataclasses

from ...config import ModelConfig
from ...forward_batch import Caches
from ..sequence import Sequence
from .kv_cache import KVCache
from .state_pool import StatePool


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    state_slots: float  # fraction of lightning state slots in use (1 = full)
    kv_blocks: float  # fraction of KV blocks in use


def rank_heads(config: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """(lightning heads, KV heads) on one rank of tp: heads split, KV heads split or (tp > KV heads) one each."""
    return config.num_attention_heads // tp, max(1, config.num_key_value_heads // tp)


class CacheManager:
    def __init__(self, state_pool: StatePool, kv_cache: KVCache):
        self.state_pool, self.kv_cache = state_pool, kv_cache
        self.caches = Caches(lightning=state_pool.states, kv=kv_cache.kv)
        self.block_size, self.scratch_block = kv_cache.block_size, kv_cache.scratch_block
        self.num_slots, self.num_blocks = state_pool.num_slots, kv_cache.num_blocks

    @classmethod
    def for_model(cls, config: ModelConfig, num_slots: int, num_blocks: int, block_size: int, dtype,
                  device, tp: int = 1) -> CacheManager:
        """The caches of one rank of `tp`: its lightning heads and KV heads (parallel layers' split)."""
        heads, kv_heads = rank_heads(config, tp)
        pool = StatePool(len(config.linear_layers), num_slots, heads, config.head_dim, device)
        kv = KVCache(len(config.softmax_layers), num_blocks, block_size, kv_heads, config.head_dim, dtype, device)
        return cls(pool, kv)

    @staticmethod
    def bytes_per_slot(config: ModelConfig, tp: int = 1) -> int:
        return StatePool.bytes_per_slot(len(config.linear_layers), rank_heads(config, tp)[0], config.head_dim)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype, tp: int = 1) -> int:
        return KVCache.bytes_per_block(len(config.softmax_layers), block_size, rank_heads(config, tp)[1],
                                       config.head_dim, dtype)

    # ---- questions the scheduler asks ----------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        return self.state_pool.num_free

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def fits(self, num_tokens: int) -> bool:
        """Whether num_tokens of context fit the whole KV cache (else a sequence that long can never run)."""
        return self.blocks_needed(num_tokens) <= self.num_blocks

    # ---- allocation ------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq, which holds nothing, a zeroed state slot and KV blocks for num_tokens tokens. False (and
        nothing taken) when no slot or not enough blocks are free."""
        assert seq.state_slot < 0 and not seq.blocks, seq.request_id
        need = self.blocks_needed(num_tokens)
        if not self.state_pool.num_free or need > self.kv_cache.num_free:
            return False
        seq.state_slot, seq.blocks = self.state_pool.allocate(), self.kv_cache.allocate(need)
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make sure seq holds KV blocks for num_tokens tokens. False (and nothing taken) when too few are free."""
        extra = self.blocks_needed(num_tokens) - len(seq.blocks)
        if extra <= 0:
            return True
        if extra > self.kv_cache.num_free:
            return False
        seq.blocks += self.kv_cache.allocate(extra)
        return True

    def release(self, seq: Sequence) -> None:
        """Give back whatever seq holds (nothing is fine)."""
        if seq.state_slot >= 0:
            self.state_pool.release(seq.state_slot)
            seq.state_slot = -1
        self.kv_cache.release(seq.blocks)
        seq.blocks = []

    def usage(self) -> CacheUsage:
        return CacheUsage(state_slots=1 - self.state_pool.num_free / self.num_slots,
                          kv_blocks=1 - self.kv_cache.num_free / self.num_blocks)
