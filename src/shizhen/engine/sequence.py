"""One request while the engine core runs it: its slot, positions, the tokens it produced and when it ends.

A sequence outlives its slot when it is preempted: it keeps its tokens, and when it is admitted again its prompt and
produced tokens are prefilled anew and it carries on. Text is not made here: the API process detokenizes and cuts
stop strings, and aborts the sequence when one is reached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .prompt import PromptInputs
from .request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    stop_token_ids: frozenset[int]
    seed: int  # the sampling noise's seed: the request's, or drawn once, so a preempted sequence draws the same
    slot: int = -1  # set at each admission
    rope_delta: int = 0  # text positions run this far ahead of cache positions (images); set by each prefill
    sampled: int = 0  # tokens sampled on the device, the one in flight included (prefill samples one)
    produced: int = 0  # tokens accepted here, on the host
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False  # ended, failed or aborted: a step still in flight for it is discarded
    aborted: bool = False  # by the API process (client gone, stop string, timeout)
    grammar: object | None = None  # an xgrammar GrammarMatcher where the output must follow a grammar

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def place(self, slot: int) -> PromptInputs:
        """Admitted into `slot` (again, after a preemption): returns what to prefill — the prompt and every token
        produced so far, whose prefill samples the next token."""
        self.slot = slot
        self.sampled = self.produced + 1
        return self.request.prompt.followed_by(self.output_ids)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt.num_tokens

    @property
    def cache_len(self) -> int:
        """Where the next decode step writes: after the prompt and every sampled token but the last."""
        return self.prompt_len + self.sampled - 1

    @property
    def next_position(self) -> int:
        return self.cache_len + self.rope_delta

    def accept(self, token_id: int) -> str | None:
        """Take the sampled token; returns the finish reason once a stop condition is met: "stop" for a stop token
        (the last token then is that stop token) or the end of its grammar, "length" at max_new_tokens."""
        self.produced += 1
        self.output_ids.append(token_id)
        if token_id in self.stop_token_ids or (self.grammar is not None and self._grammar_ends(token_id)):
            reason = "stop"
        elif self.produced == self.request.sampling.max_new_tokens:
            reason = "length"
        else:
            return None
        self.finished = True
        return reason

    def _grammar_ends(self, token_id: int) -> bool:
        if not self.grammar.accept_token(token_id):  # the mask allowed only what the grammar does: a bug if seen
            log.error("request %s: token %d is outside its grammar; the answer ends here", self.request_id, token_id)
            return True
        return self.grammar.is_terminated()
