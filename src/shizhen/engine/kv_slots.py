"""The static, slot-addressed KV cache: for every layer, K and V of shape [slots, kv_heads, max_len, head_dim].

Row i of a decode batch is always slot i, so a batch reads the cache through plain views (no gather) and a CUDA
graph captured over those views stays valid for as long as the cache lives. text_stack.py writes and reads it.
"""

from __future__ import annotations

import heapq

import torch


class KVSlots:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, max_len, head_dim)
        # zeros, not empty: masked-out positions still meet V in a matmul, and 0 * NaN would poison the row
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class SlotAllocator:
    """Hands out the lowest free slot, so running sequences stay packed at the bottom of the cache and decode
    batches (slots [0, highest+1)) stay small."""

    def __init__(self, slots: int):
        self._free = list(range(slots))

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def free(self) -> int:
        return len(self._free)
