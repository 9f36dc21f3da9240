"""One request while the engine runs it: its slot, positions, generated tokens, text and stop state."""

from __future__ import annotations

from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .request import GenerationOutput, RequestStream


@dataclass
class Sequence:
    stream: RequestStream
    slot: int
    rope_delta: int
    detokenizer: IncrementalDetokenizer
    stopper: StopStringMatcher
    stop_token_ids: frozenset[int]
    sampled: int = 1  # tokens sampled on the device, the one in flight included (prefill samples the first)
    produced: int = 0  # tokens accepted here, on the host
    finished: bool = field(default=False)

    @property
    def prompt_len(self) -> int:
        return self.stream.request.prompt.num_tokens

    @property
    def cache_len(self) -> int:
        """Where the next decode step writes: after the prompt and every sampled token but the last."""
        return self.prompt_len + self.sampled - 1

    @property
    def next_position(self) -> int:
        return self.cache_len + self.rope_delta

    def accept(self, token_id: int) -> GenerationOutput:
        """Take the sampled token; returns the output to send (finished when a stop condition is met)."""
        self.produced += 1
        if token_id in self.stop_token_ids:
            return self._finish(self._drain()[0], "stop")
        text, hit_stop = self.stopper.feed(self.detokenizer.push(token_id))
        if hit_stop:
            return self._finish(text, "stop")
        if self.produced == self.stream.request.sampling.max_new_tokens:
            tail, hit_stop = self._drain()
            return self._finish(text + tail, "stop" if hit_stop else "length")
        return GenerationOutput(text, self.produced)

    def _finish(self, text: str, reason: str) -> GenerationOutput:
        self.finished = True
        return GenerationOutput(text, self.produced, reason)

    def abort(self) -> None:
        """Stop accepting tokens: a decode step still in flight for this sequence is discarded."""
        self.finished = True

    def _drain(self) -> tuple[str, bool]:
        """At the end: release all held-back text, still cutting at a stop string."""
        text, hit_stop = self.stopper.feed(self.detokenizer.flush())
        return (text, True) if hit_stop else (text + self.stopper.flush(), False)
