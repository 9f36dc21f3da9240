"""Which requests run, and who holds which KV blocks: plain Python, no torch, so its rules are testable anywhere.

Between two decode steps the engine admits waiting requests in arrival order while a slot and the KV blocks for the
prompt are free and the step's prefill budget lasts — at least one per step, so a long prompt is never starved; a
request that does not fit yet waits, and so do those behind it. Admitted prompts are prefilled together, padded to
the longest, so the budget counts padded tokens.

Blocks are taken as sequences grow (one more every BLOCK_SIZE tokens), not reserved for a whole completion up front:
most answers end long before `max_tokens`. When a growing sequence finds no free block, the most recently started
sequence is preempted, as in vLLM: it gives its slot and blocks back and goes to the front of the queue, and when
it is admitted again its prompt and the tokens it produced are prefilled anew, and it carries on where it stopped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .allocation import BLOCK_SIZE, LowestFirst, blocks_for
from .sequence import Sequence


@dataclass(frozen=True)
class Admission:
    """A sequence to prefill now, into `slot` and `blocks` (a preempted one comes back the same way)."""

    sequence: Sequence
    slot: int
    blocks: list[int]


class Scheduler:
    def __init__(self, slots: int, blocks: int, prefill_token_budget: int):
        self._slots = LowestFirst(range(slots))
        self._blocks = LowestFirst(range(1, blocks))  # block 0 is the scratch block (kv_cache.py)
        # admitting leaves this many blocks free while others run, so the running ones can grow a while
        self._watermark = max(1, self._blocks.total // 100)
        self._held: dict[int, list[int]] = {}  # slot → its blocks
        self._prefill_token_budget = prefill_token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot → sequence, in the order they started

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        return 1 - self._blocks.free / self._blocks.total

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def drop_waiting(self, sequence: Sequence) -> None:
        self.waiting.remove(sequence)

    def admissions(self) -> list[Admission]:
        """Pop the sequences to prefill now, each with the slot and the KV blocks it gets; they count as running
        from here."""
        admitted: list[Admission] = []
        longest = 0
        while self.waiting and self._slots.free:
            sequence = self.waiting[0]
            tokens = sequence.prompt_len + sequence.produced
            longest_with = max(longest, tokens)
            if admitted and longest_with * (len(admitted) + 1) > self._prefill_token_budget:
                break
            needed = blocks_for(tokens + 1)  # the prompt and the first decode step's position
            reserve = self._watermark if self.running or admitted else 0
            if needed + reserve > self._blocks.free:
                break
            self.waiting.popleft()
            [slot] = self._slots.allocate()
            self._held[slot] = self._blocks.allocate(needed)
            self.running[slot] = sequence
            admitted.append(Admission(sequence, slot, self._held[slot]))
            longest = longest_with
        return admitted

    def is_running(self, sequence: Sequence) -> bool:
        """False once it finished, was cancelled or was preempted (its slot may hold another sequence later)."""
        return self.running.get(sequence.slot) is sequence

    def release(self, slot: int) -> None:
        self.running.pop(slot, None)
        self._blocks.release(self._held.pop(slot))
        self._slots.release([slot])

    def aborted(self) -> list[Sequence]:
        return [sequence for sequence in self.running.values() if sequence.aborted]

    def decode_batch(self) -> list[Sequence]:
        return sorted(self.running.values(), key=lambda sequence: sequence.slot)

    # --- growth and preemption ---------------------------------------------------------------------------------
    def outgrowing(self) -> list[Sequence]:
        """Running sequences whose next decode step writes past their last block, oldest first."""
        return [sequence for slot, sequence in self.running.items()
                if len(self._held[slot]) * BLOCK_SIZE <= sequence.cache_len]

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

