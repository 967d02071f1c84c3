"""Paged KV for the softmax layers: fixed-size blocks, each with a reference count."""
import torch


class KVCache:
    """kv [layers, k/v, num_blocks + 1, block_size, kv_heads, D]. The extra block (`scratch_block`) belongs to no
    request: padding rows write their KV there and pad their block tables with it. A block is free at
    reference count 0; `allocate` hands blocks out at count 1 and `release` drops one count, so blocks that
    several sequences share (prefix caching) fit the same bookkeeping."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype, device):
        self.kv = torch.zeros(num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the most recently freed block goes first

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError("KV cache exhausted")  # the cache manager checks num_free first
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            assert self.ref_counts[b] > 0, f"block {b} released but not held"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)
