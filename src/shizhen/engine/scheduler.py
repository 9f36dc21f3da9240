"""Which requests run, and who holds which KV blocks: plain Python, no torch, so its rules are testable anywhere.

Each step prefills up to `prefill_token_budget` prompt tokens: first more of the prompts already being prefilled, then
waiting requests admitted in arrival order while a slot and the KV blocks for the prompt are free (a request that
does not fit yet waits, and so do those behind it). A prompt longer than what is left of the budget is prefilled in
chunks over several steps, so the sequences decoding meanwhile wait at most one chunk's compute between two tokens.
A prompt's leading full blocks already in the prefix cache (allocation.BlockPool) are taken, not computed.

Blocks are taken as sequences grow (one more every BLOCK_SIZE tokens), not reserved for a whole completion up front:
most answers end long before `max_tokens`. When a growing sequence finds no free block, the most recently started
sequence is preempted, as in vLLM: it gives its slot and blocks back (they stay cached) and goes to the front of the
queue, and when it is admitted again its prompt and the tokens it produced are prefilled anew from what is still
cached, and it carries on where it stopped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .allocation import BLOCK_SIZE, BlockPool, LowestFirst, blocks_for
from .sequence import Sequence


@dataclass(frozen=True)
class PrefillChunk:
    """Positions [start, end) of a sequence's prefill to run now, into its slot and `blocks` (its block table)."""

    sequence: Sequence
    blocks: list[int]
    start: int
    end: int

    @property
    def final(self) -> bool:
        """Its last position's logits sample the sequence's next token, and the sequence decodes from then on."""
        return self.end == self.sequence.prefill.num_tokens


class Scheduler:
    def __init__(self, slots: int, blocks: int, prefill_token_budget: int, prefix_caching: bool = True):
        self._slots = LowestFirst(range(slots))
        self._blocks = BlockPool(range(1, blocks), prefix_caching)  # block 0 is the scratch block (kv_cache.py)
        # admitting leaves this many blocks free while others run, so the running ones can grow a while
        self._watermark = max(1, self._blocks.total // 100)
        self._held: dict[int, list[int]] = {}  # slot → its blocks
        self._prefill_token_budget = prefill_token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot → sequence, in the order they started (prefilling included)
        self.prefix_queried_tokens = 0  # prefill tokens looked up in the prefix cache, since start
        self.prefix_hit_tokens = 0  # of which found there

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        """The share of blocks held by running sequences (cached blocks nobody holds count as free)."""
        return 1 - self._blocks.free / self._blocks.total

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def drop_waiting(self, sequence: Sequence) -> None:
        self.waiting.remove(sequence)

    def prefill_chunks(self) -> list[PrefillChunk]:
        """This step's prefill work, at most the budget's tokens; sequences admitted here count as running."""
        budget = self._prefill_token_budget
        chunks = []
        for sequence in [s for s in self.running.values() if s.prefilling]:
            if not budget:
                break
            chunks.append(self._chunk(sequence, budget))
            budget -= chunks[-1].end - chunks[-1].start
        while budget and self.waiting and self._slots.free and self._admit(self.waiting[0]):
            chunks.append(self._chunk(self.waiting.popleft(), budget))
            budget -= chunks[-1].end - chunks[-1].start
        return chunks

    def _chunk(self, sequence: Sequence, budget: int) -> PrefillChunk:
        start = sequence.prefilled
        return PrefillChunk(sequence, self._held[sequence.slot], start,
                            min(start + budget, sequence.prefill.num_tokens))

    def _admit(self, sequence: Sequence) -> bool:
        """A slot and blocks for the prompt and the first decode step's position, its cached prefix taken (all of
        it but the last token at most, whose logits are needed); False if the blocks are not free."""
        tokens = sequence.prompt_len + sequence.produced
        cached = self._blocks.cached(sequence.block_hashes((tokens - 1) // BLOCK_SIZE))
        needed = blocks_for(tokens + 1) - len(cached)
        reserve = self._watermark if self.running else 0
        if needed + reserve > self._blocks.free_after_taking(cached):
            return False
        self._blocks.take(cached)
        [slot] = self._slots.allocate()
        self._held[slot] = cached + self._blocks.allocate(needed)
        self.running[slot] = sequence
        sequence.place(slot, len(cached) * BLOCK_SIZE)
        self.prefix_queried_tokens += tokens
        self.prefix_hit_tokens += len(cached) * BLOCK_SIZE
        return True

    def prefilled(self, chunks: list[PrefillChunk]) -> None:
        """The chunks' prefill is queued on the device: their full blocks can be found by later prompts."""
        for chunk in chunks:
            chunk.sequence.prefilled = chunk.end
            self._register(chunk.sequence)

    def _register(self, sequence: Sequence) -> None:
        held = self._held[sequence.slot]
        full = min(sequence.kv_written // BLOCK_SIZE, len(held))
        for block, block_hash in zip(held, sequence.block_hashes(full)):
            self._blocks.register(block, block_hash)

    def is_running(self, sequence: Sequence) -> bool:
        """False once it finished, was cancelled or was preempted (its slot may hold another sequence later)."""
        return self.running.get(sequence.slot) is sequence

    def release(self, slot: int, cache: bool = True) -> None:
        """Free the slot and its blocks; with `cache`, its full blocks written so far stay findable (not for a
        sequence that failed: what it wrote may be wrong)."""
        sequence = self.running.pop(slot)
        if cache:
            self._register(sequence)
        self._blocks.release(self._held.pop(slot))
        self._slots.release([slot])

    def aborted(self) -> list[Sequence]:
        return [sequence for sequence in self.running.values() if sequence.aborted]

    def decode_batch(self) -> list[Sequence]:
        """The running sequences done prefilling, by slot."""
        return sorted((s for s in self.running.values() if not s.prefilling), key=lambda sequence: sequence.slot)

    # --- growth and preemption ---------------------------------------------------------------------------------
    def outgrowing(self) -> list[Sequence]:
        """Decoding sequences whose next decode step writes past their last block, oldest first."""
        return [sequence for slot, sequence in self.running.items()
                if not sequence.prefilling and len(self._held[slot]) * BLOCK_SIZE <= sequence.cache_len]
    def grow(self, sequence: Sequence) -> tuple[int, int] | None:
        """One more block for `sequence`: (its index in the sequence's block table, the block), or None if none
        is free."""
        block = self._blocks.allocate(1)
        if block is None:
            return None
        held = self._held[sequence.slot]
        held.extend(block)
        return len(held) - 1, block[0]

    def preempt_newest(self) -> Sequence:
        """Take the most recently started sequence off the GPU: its slot and blocks are freed and it waits first
        in line to be recomputed. The caller makes sure no step still in flight has tokens for it."""
        sequence = next(reversed(self.running.values()))
        self.release(sequence.slot)
        self.waiting.appendleft(sequence)
        return sequence

