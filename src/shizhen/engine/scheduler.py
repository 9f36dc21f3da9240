"""Which requests run: plain Python, no torch, so its rules are testable anywhere.

Between two decode steps the engine admits waiting requests in arrival order while a slot and the KV blocks for the
request's prompt and whole completion are free and the step's prefill budget lasts — at least one per step, so a
long prompt is never starved; a request that does not fit yet waits, and so do those behind it. Admitted prompts
are prefilled together, padded to the longest, so the budget counts padded tokens.
"""

from __future__ import annotations

from collections import deque

from .allocation import LowestFirst, blocks_for
from .request import RequestStream
from .sequence import Sequence


class Scheduler:
    def __init__(self, slots: int, blocks: int, prefill_token_budget: int):
        self._slots = LowestFirst(range(slots))
        self._blocks = LowestFirst(range(1, blocks))  # block 0 is the scratch block (kv_cache.py)
        self._held: dict[int, list[int]] = {}  # slot → its blocks
        self._prefill_token_budget = prefill_token_budget
        self.waiting: deque[RequestStream] = deque()
        self.running: dict[int, Sequence] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        return 1 - self._blocks.free / self._blocks.total

    def add(self, stream: RequestStream) -> None:
        self.waiting.append(stream)

    def admissions(self) -> list[tuple[RequestStream, int, list[int]]]:
        """Pop the requests to prefill now, each with the slot and the KV blocks it gets."""
        admitted: list[tuple[RequestStream, int, list[int]]] = []
        longest = 0
        while self.waiting and self._slots.free:
            stream = self.waiting[0]
            if stream.cancelled:
                self.waiting.popleft()
                continue
            longest_with = max(longest, stream.request.prompt.num_tokens)
            if admitted and longest_with * (len(admitted) + 1) > self._prefill_token_budget:
                break
            request = stream.request
            blocks = self._blocks.allocate(blocks_for(request.prompt.num_tokens + request.sampling.max_new_tokens))
            if blocks is None:
                break
            self.waiting.popleft()
            [slot] = self._slots.allocate()
            self._held[slot] = blocks
            admitted.append((stream, slot, blocks))
            longest = longest_with
        return admitted

    def start(self, sequence: Sequence) -> None:
        self.running[sequence.slot] = sequence

    def release(self, slot: int) -> None:
        self.running.pop(slot, None)
        self._blocks.release(self._held.pop(slot))
        self._slots.release([slot])

    def cancelled(self) -> list[Sequence]:
        return [sequence for sequence in self.running.values() if sequence.stream.cancelled]

    def decode_batch(self) -> list[Sequence]:
        return sorted(self.running.values(), key=lambda sequence: sequence.slot)
