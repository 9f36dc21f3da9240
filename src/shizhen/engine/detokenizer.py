"""Token ids → text deltas that are whole characters, with OpenAI `stop` strings cut out.

Byte-level BPE splits one Chinese character over several tokens; decoding token by token would emit U+FFFD halves.
The offsets method (as in TGI and vLLM) re-decodes a short window and only releases text once it no longer ends in
an incomplete character. Stop strings may span token boundaries, so the tail that could still begin a stop string
is held back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_INCOMPLETE = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: object  # a transformers tokenizer
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_INCOMPLETE):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still undecoded at the end, replacement characters included."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


@dataclass
class StopStringMatcher:
    """Releases text unless it might be the start of a stop string; reports when one is complete."""

    stops: tuple[str, ...]
    _pending: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was reached)."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self._pending = self._pending[: min(hits)], ""
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
