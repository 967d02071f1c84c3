"""Fixed fp32 slots for the lightning layers' recurrent states: one slot per running request."""
import torch


class StatePool:
    def __init__(self, num_layers: int, num_slots: int, num_heads: int, head_dim: int, device):
        # [layers, slots, H, D, D]: layer l's pool is states[l], the [S, H, D, D] tensor the ops take
        self.states = torch.zeros(num_layers, num_slots, num_heads, head_dim, head_dim,
                                  dtype=torch.float32, device=device)
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self.fresh: list[int] | None = None  # on rank 0 of several: slots zeroed since the last step (workers.py)

    @staticmethod
    def bytes_per_slot(num_layers: int, num_heads: int, head_dim: int) -> int:
        return num_layers * num_heads * head_dim * head_dim * 4

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take a slot and zero it: a new request starts from the zero state."""
        if not self._free:
            raise RuntimeError("state pool exhausted")  # the cache manager checks num_free first
        slot = self._free.pop()
        self.states[:, slot].zero_()
        if self.fresh is not None:
            self.fresh.append(slot)
        return slot

    def release(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, slot
        self._free.append(slot)
