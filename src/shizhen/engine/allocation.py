"""Who holds which KV-cache blocks and slots: plain Python, no torch, so the scheduler's rules are testable anywhere."""

from __future__ import annotations

import heapq

BLOCK_SIZE = 64  # positions per KV-cache block; decode attention reads one block per iteration


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


class LowestFirst:
    """Hands out the lowest free ids first: slots stay packed at the bottom, so decode batches (slots
    [0, highest+1)) stay small, and the order of blocks is deterministic."""

    def __init__(self, ids: range):
        self._free = list(ids)
        heapq.heapify(self._free)
        self.total = len(self._free)

    def allocate(self, count: int = 1) -> list[int] | None:
        if count > len(self._free):
            return None
        return [heapq.heappop(self._free) for _ in range(count)]

    def release(self, ids: list[int]) -> None:
        for item in ids:
            heapq.heappush(self._free, item)

    @property
    def free(self) -> int:
        return len(self._free)
