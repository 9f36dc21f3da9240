"""One request while the engine runs it: its slot, positions, generated tokens, text and stop state.

A sequence outlives its slot when it is preempted: it keeps its tokens, text and stop state, and when it is admitted
again its prompt and produced tokens are prefilled anew and it carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .prompt import PromptInputs
from .request import GenerationOutput, RequestStream


@dataclass
class Sequence:
    stream: RequestStream
    detokenizer: IncrementalDetokenizer
    stopper: StopStringMatcher
    stop_token_ids: frozenset[int]
    seed: int  # the sampling noise's seed: the request's, or drawn once, so a preempted sequence draws the same
    slot: int = -1  # set at each admission
    rope_delta: int = 0  # text positions run this far ahead of cache positions (images); set by each prefill
    sampled: int = 0  # tokens sampled on the device, the one in flight included (prefill samples one)
    produced: int = 0  # tokens accepted here, on the host
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False

    def place(self, slot: int) -> PromptInputs:
        """Admitted into `slot` (again, after a preemption): returns what to prefill — the prompt and every token
        produced so far, whose prefill samples the next token."""
        self.slot = slot
        self.sampled = self.produced + 1
        return self.stream.request.prompt.followed_by(self.output_ids)

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
        self.output_ids.append(token_id)
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
