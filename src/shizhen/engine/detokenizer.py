"""Token ids → text deltas that are whole characters, with OpenAI `stop` strings cut out (in the API process).

Byte-level BPE splits one Chinese character over several tokens; decoding token by token would emit U+FFFD halves.
tokenizers' DecodeStream (the Rust incremental decoder vLLM uses for fast tokenizers) releases text only once its
characters are complete, at a few microseconds a token. Stop strings may span token boundaries, so the tail that
could still begin a stop string is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from .request import GenerationOutput
from .sampling import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        """`tokenizer`: a transformers tokenizer backed by `tokenizers` (every one transformers 5 loads)."""
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # pushed since the last text: the start of a character not yet complete

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        text = self._stream.step(self._tokenizer.backend_tokenizer, token_id)
        if text is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return text

    def flush(self) -> str:
        """Whatever is still undecoded at the end, replacement characters included."""
        held, self._held = self._held, []
        return self._tokenizer.decode(held, skip_special_tokens=True) if held else ""


@dataclass
class StopStringMatcher:
    """Releases text unless it might be the start of a stop string; reports when one is complete."""

    stops: tuple[str, ...]
    include_stop: bool = False  # the stop string found is released too (vLLM's include_stop_str_in_output)
    _pending: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was reached)."""
        self._pending += text
        hits = [(i, len(s)) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            at, length = min(hits)
            end = at + length if self.include_stop else at
            released, self._pending = self._pending[:end], ""
            return released, True
        cut = len(self._pending) - self._longest_stop_prefix_at_end()
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def _longest_stop_prefix_at_end(self) -> int:
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return released


class TextAssembler:
    """One request's tokens, as the engine hands them out in batches → outputs with whole-character text.

    The engine ends a request with "stop" only on a stop token, which is the batch's last and is not text; it knows
    nothing of stop strings: one found here ends the output ("stop"), and the caller aborts the engine's request.
    """

    def __init__(self, tokenizer, sampling: SamplingParams):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stopper = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output)
        self._min_tokens = sampling.min_tokens  # no stop string ends the text before this many tokens
        self.completion_tokens = 0

    def feed(self, tokens: list[int], finish_reason: str | None, logprobs: list | None = None) -> GenerationOutput:
        """`logprobs`, where asked for: the engine's [logprob, top ids, top logprobs] per token; the output keeps
        those of the tokens that made text (not a stop token's, nor any after a stop string)."""
        text_tokens = tokens[:-1] if finish_reason == "stop" else tokens
        pieces = []
        used = len(text_tokens)
        reason = finish_reason
        for index, token in enumerate(text_tokens):
            self.completion_tokens += 1
            text = self._detokenizer.push(token)
            if self.completion_tokens <= self._min_tokens:
                pieces.append(text)
                continue
            text, hit_stop = self._stopper.feed(text)
            pieces.append(text)
            if hit_stop:
                used, reason = index + 1, "stop"
                break
        else:
            self.completion_tokens += len(tokens) - len(text_tokens)
            if finish_reason is not None:
                tail, hit_stop = self._drain()
                pieces.append(tail)
                reason = "stop" if hit_stop else finish_reason
        return GenerationOutput("".join(pieces), self.completion_tokens, reason,
                                _token_logprobs(tokens[:used], logprobs))

    def _drain(self) -> tuple[str, bool]:
        """At the end: release all held-back text, still cutting at a stop string."""
        text, hit_stop = self._stopper.feed(self._detokenizer.flush())
        return (text, True) if hit_stop else (text + self._stopper.flush(), False)


def _token_logprobs(tokens: list[int], logprobs: list | None) -> list | None:
    if logprobs is None:
        return None
    return [(token, logprob, list(zip(top_ids, top_logprobs, strict=True)))
            for token, (logprob, top_ids, top_logprobs) in zip(tokens, logprobs)]
