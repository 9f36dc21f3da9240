"""The SSE lines of a streamed answer, in chat's shape (`chat.completion.chunk`) or the legacy text completions'
(`text_completion`). The chat service runs the stream; a shape only says what each moment of it looks like."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pydantic import BaseModel

from .engine.request import GenerationOutput, GenerationRequest
from .protocol import ChatCompletionChunk, ChunkChoice, Delta, TextChoice, TextCompletion, Usage, now

if TYPE_CHECKING:
    from .serving import ChatService


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def usage_of(request: GenerationRequest, completion_tokens: int) -> Usage:
    prompt_tokens = request.prompt.num_tokens
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


class ContentChunks:
    """A stream's content deltas — one per engine step per stream, the hot path of a busy server — as the JSON of
    its chunk model with the text spliced in: the rest of the chunk never changes, and building and dumping the
    model each time cost ten times more."""

    SPLICE = "\x00content\x00"

    def __init__(self, template: str):
        """`template`: the SSE line of a content chunk whose content is SPLICE."""
        self._before, self._after = template.split(json.dumps(self.SPLICE)[1:-1])

    def __call__(self, text: str) -> str:
        return self._before + json.dumps(text, ensure_ascii=False)[1:-1] + self._after


class ChunkShape(ABC):
    """What each moment of a stream looks like: the opening lines, a content delta, the finish, the usage."""

    def __init__(self, service: ChatService, request: GenerationRequest, model: str, continuous_usage: bool):
        """`continuous_usage`: vLLM's continuous_usage_stats (with include_usage): every chunk carries the usage
        so far."""
        self._service = service
        self._request = request
        self._model = model
        self._created = now()
        self._continuous = continuous_usage

    @abstractmethod
    def opening(self) -> list[str]: ...

    @abstractmethod
    def content(self, output: GenerationOutput) -> str: ...

    @abstractmethod
    def finish(self, output: GenerationOutput) -> str: ...

    def _so_far(self, completion_tokens: int) -> Usage | None:
        return usage_of(self._request, completion_tokens) if self._continuous else None

    def usage(self, output: GenerationOutput) -> str:
        return self._line([], usage_of(self._request, output.completion_tokens))

    @abstractmethod
    def _line(self, choices: list, usage: Usage | None) -> str:
        """One SSE line of this shape."""


class ChatChunks(ChunkShape):
    """Role chunk, content deltas, an empty delta with the finish reason."""

    def __init__(self, *args):
        super().__init__(*args)
        self._spliced = ContentChunks(self._line([ChunkChoice(delta=Delta(content=ContentChunks.SPLICE))], None))

    def _line(self, choices: list, usage: Usage | None) -> str:
        return sse(ChatCompletionChunk(id=self._request.request_id, created=self._created, model=self._model,
                                       choices=choices, usage=usage))

    def opening(self) -> list[str]:
        return [self._line([ChunkChoice(delta=Delta(role="assistant", content=""))], self._so_far(0))]

    def content(self, output: GenerationOutput) -> str:
        if not self._continuous and output.logprobs is None:
            return self._spliced(output.text)
        logprobs = self._service.chat_logprobs(self._request, output.logprobs or [])
        return self._line([ChunkChoice(delta=Delta(content=output.text), logprobs=logprobs)],
                          self._so_far(output.completion_tokens))

    def finish(self, output: GenerationOutput) -> str:
        return self._line([ChunkChoice(delta=Delta(), finish_reason=output.finish_reason)],
                          self._so_far(output.completion_tokens))


class TextChunks(ChunkShape):
    """Text deltas, then an empty one with the finish reason; logprobs' text offsets run on over the chunks."""

    def __init__(self, *args):
        super().__init__(*args)
        self._offset = 0

    def _line(self, choices: list, usage: Usage | None) -> str:
        return sse(TextCompletion(id=self._request.request_id, created=self._created, model=self._model,
                                  choices=choices, usage=usage))

    def opening(self) -> list[str]:
        return []

    def content(self, output: GenerationOutput) -> str:
        logprobs = self._service.text_logprobs(self._request, output.logprobs or [], self._offset)
        if logprobs is not None:  # offsets count the tokens' own texts, as vLLM's do
            self._offset += sum(map(len, logprobs.tokens))
        return self._line([TextChoice(text=output.text, logprobs=logprobs)], self._so_far(output.completion_tokens))

    def finish(self, output: GenerationOutput) -> str:
        return self._line([TextChoice(text="", finish_reason=output.finish_reason)],
                          self._so_far(output.completion_tokens))
