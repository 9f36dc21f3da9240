"""Which requests run: plain Python, no torch, so its rules are testable anywhere.

Between two decode steps the engine admits waiting requests in arrival order while a slot is free and the step's
prefill budget lasts — at least one per step, so a long prompt is never starved. Admitted prompts are prefilled
together, padded to the longest, so the budget counts padded tokens.
"""

from __future__ import annotations

from collections import deque

from .kv_slots import SlotAllocator
from .request import RequestStream
from .sequence import Sequence


class Scheduler:
    def __init__(self, slots: int, prefill_token_budget: int):
        self._allocator = SlotAllocator(slots)
        self._prefill_token_budget = prefill_token_budget
        self.waiting: deque[RequestStream] = deque()
        self.running: dict[int, Sequence] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, stream: RequestStream) -> None:
        self.waiting.append(stream)

    def admissions(self) -> list[tuple[RequestStream, int]]:
        """Pop the requests to prefill now, each with the slot it gets."""
        admitted: list[tuple[RequestStream, int]] = []
        longest = 0
        while self.waiting and self._allocator.free:
            stream = self.waiting[0]
            if stream.cancelled:
                self.waiting.popleft()
                continue
            longest_with = max(longest, stream.request.prompt.num_tokens)
            if admitted and longest_with * (len(admitted) + 1) > self._prefill_token_budget:
                break
            self.waiting.popleft()
            admitted.append((stream, self._allocator.allocate()))
            longest = longest_with
        return admitted

    def start(self, sequence: Sequence) -> None:
        self.running[sequence.slot] = sequence

    def release(self, slot: int) -> None:
        self.running.pop(slot, None)
        self._allocator.release(slot)

    def cancelled(self) -> list[Sequence]:
        return [sequence for sequence in self.running.values() if sequence.stream.cancelled]

    def decode_batch(self) -> list[Sequence]:
        return sorted(self.running.values(), key=lambda sequence: sequence.slot)
