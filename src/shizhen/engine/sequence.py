"""One request while the engine core runs it: its slot, positions, the tokens it produced and when it ends.

A sequence outlives its slot when it is preempted: it keeps its tokens, and when it is admitted again its prompt and
produced tokens are prefilled anew (from its blocks still cached, mostly) and it carries on. Text is not made here:
the API process detokenizes and cuts stop strings, and aborts the sequence when one is reached.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass, field

from .allocation import BLOCK_SIZE
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
    # this admission's prefill: the prompt and the tokens produced before it; `prefilled` of them have their KV
    # written or queued (a cached prefix counts), and the sequence decodes once all have
    prefill: PromptInputs | None = None
    prefilled: int = 0
    cached_tokens: int | None = None  # prompt tokens its first admission found in the prefix cache
    _block_hashes: list[bytes] = field(default_factory=list)
    _images: list[tuple[int, int]] | None = None  # the prompt's image_spans()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def place(self, slot: int, cached_tokens: int) -> None:
        """Admitted into `slot` (again, after a preemption) with its first `cached_tokens` in cached blocks: what
        to prefill is the prompt and every token produced so far, whose last position samples the next token."""
        self.slot = slot
        self.sampled = self.produced + 1
        self.prefill = self.request.prompt.followed_by(self.output_ids)
        self.prefilled = cached_tokens
        if self.cached_tokens is None:
            self.cached_tokens = min(cached_tokens, self.prompt_len)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.prefill.num_tokens

    @property
    def kv_written(self) -> int:
        """Positions whose K/V is written or queued: the prefilled ones, then every accepted token but the last
        (the step that sampled it fed the one before)."""
        if self.prefilling:
            return self.prefilled
        return max(self.prefilled, self.prompt_len + self.produced - 1)

    def block_hashes(self, count: int) -> list[bytes]:
        """The content hashes of the first `count` full blocks of the prompt and output, each chained over every
        token before its end and over the images whose tokens it holds (their placeholder ids are all alike)."""
        while len(self._block_hashes) < count:
            start = len(self._block_hashes) * BLOCK_SIZE
            end = start + BLOCK_SIZE
            prompt_ids = self.request.prompt.input_ids[0, start:end].tolist()
            tokens = prompt_ids + self.output_ids[max(start - self.prompt_len, 0) : max(end - self.prompt_len, 0)]
            digest = hashlib.sha256(self._block_hashes[-1] if self._block_hashes else b"")
            digest.update(array("q", tokens).tobytes())
            for (first, last), image_hash in zip(self._image_spans(), self.request.prompt.image_hashes,
                                                 strict=True):
                if first < end and last > start:
                    digest.update(image_hash.encode())
            self._block_hashes.append(digest.digest())
        return self._block_hashes[:count]

    def _image_spans(self) -> list[tuple[int, int]]:
        if self._images is None:
            self._images = self.request.prompt.image_spans()
        return self._images

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
