"""Who holds which KV-cache blocks and slots: plain Python, no torch, so the scheduler's rules are testable anywhere."""

from __future__ import annotations

import heapq
from collections import OrderedDict

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


class BlockPool:
    """The KV blocks, with automatic prefix caching as vLLM does it: a full block whose contents are known is
    registered under its content hash (chained over every token before it, images included) and outlives the
    sequence that wrote it. Later sequences with the same prefix take it (shared read-only: only full blocks are
    shared, and a sequence writes only past its shared ones); nobody holding it, it is evicted least recently used,
    and only when no never-registered block is free.
    """

    def __init__(self, ids: range, caching: bool = True):
        self._unregistered = LowestFirst(ids)  # free and holding nothing anyone can find
        self.total = self._unregistered.total
        self.caching = caching
        self._holders: dict[int, int] = {}  # block → how many sequences hold it
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, held by none; oldest use first

    @property
    def free(self) -> int:
        """Blocks that can be handed out: never registered, or registered and held by nobody."""
        return self._unregistered.free + len(self._evictable)

    def cached(self, hashes: list[bytes]) -> list[int]:
        """The registered blocks of the longest run of `hashes` from the first (a prefix hit)."""
        found = []
        if self.caching:
            for block_hash in hashes:
                block = self._block_of.get(block_hash)
                if block is None:
                    break
                found.append(block)
        return found

    def free_after_taking(self, blocks: list[int]) -> int:
        """How many blocks stay free once `blocks` (cached ones) are taken: those held by nobody are free now."""
        return self.free - sum(block in self._evictable for block in blocks)

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks (found by `cached`)."""
        for block in blocks:
            self._evictable.pop(block, None)
            self._holders[block] = self._holders.get(block, 0) + 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks to write into, or None if fewer are free; registered ones are evicted oldest first."""
        if count > self.free:
            return None
        blocks = self._unregistered.allocate(min(count, self._unregistered.free))
        while len(blocks) < count:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            blocks.append(block)
        for block in blocks:
            self._holders[block] = 1
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """`block` (held) is full and written: findable under `block_hash` from now on. A block with the same
        contents already registered stays the one found; this one is freed plainly when released."""
        if self.caching and block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def release(self, blocks: list[int]) -> None:
        """One holder fewer for each of `blocks` (a sequence's, in order); those held by nobody become free.
        Registered ones stay findable until evicted, a sequence's last blocks first: its first ones are the prefix
        other conversations are likeliest to share."""
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block]:
                continue
            del self._holders[block]
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._unregistered.release([block])
