"""The SSE lines of a streamed answer, in chat's shape (`chat.completion.chunk`) or the legacy text completions'
(`text_completion`). The chat service runs the stream; a shape only says what each moment of it looks like."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pydantic import BaseModel

from .engine.request import GenerationOutput, GenerationRequest
from .protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    PromptTokensDetails,
    TextChoice,
    TextCompletion,
    ToolCallDelta,
    Usage,
    now,
)
from .tool_calls import CallDelta, StreamingToolCalls, ToolUse

if TYPE_CHECKING:
    from .serving import ChatService


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def usage_of(request: GenerationRequest, output: GenerationOutput | None) -> Usage:
    """The usage after `output` (None: before any), with the prompt tokens found in the prefix cache once known."""
    prompt_tokens = request.prompt.num_tokens
    completion_tokens = output.completion_tokens if output is not None else 0
    cached = output.cached_tokens if output is not None else None
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached) if cached is not None else None)


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

    def __init__(self, service: ChatService, request: GenerationRequest, model: str, continuous_usage: bool,
                 tools: ToolUse | None = None):
        """`continuous_usage`: vLLM's continuous_usage_stats (with include_usage): every chunk carries the usage
        so far. `tools`: the calls the answer may make (chat only)."""
        self._service = service
        self._tools = tools
        self._request = request
        self._model = model
        self._created = now()
        self._continuous = continuous_usage

    @abstractmethod
    def opening(self) -> list[str]: ...

    @abstractmethod
    def content(self, output: GenerationOutput) -> str:
        """The line for new text; "" when there is nothing to send yet."""

    @abstractmethod
    def finish(self, output: GenerationOutput) -> str: ...

    def _so_far(self, output: GenerationOutput | None) -> Usage | None:
        return usage_of(self._request, output) if self._continuous else None

    def usage(self, output: GenerationOutput) -> str:
        return self._line([], usage_of(self._request, output))

    @abstractmethod
    def _line(self, choices: list, usage: Usage | None) -> str:
        """One SSE line of this shape."""


class ChatChunks(ChunkShape):
    """Role chunk, content deltas, an empty delta with the finish reason. Where tools may be called, calls go out
    as OpenAI streams them: a delta with the call's index, id and name, then deltas of its arguments."""

    def __init__(self, *args):
        super().__init__(*args)
        self._spliced = ContentChunks(self._line([ChunkChoice(delta=Delta(content=ContentChunks.SPLICE))], None))
        self._calls = StreamingToolCalls(self._tools.names) if self._tools else None

    def _line(self, choices: list, usage: Usage | None) -> str:
        return sse(ChatCompletionChunk(id=self._request.request_id, created=self._created, model=self._model,
                                       choices=choices, usage=usage))

    def opening(self) -> list[str]:
        return [self._line([ChunkChoice(delta=Delta(role="assistant", content=""))], self._so_far(None))]

    def content(self, output: GenerationOutput) -> str:
        if self._calls is not None:
            text, calls = self._calls.push(output.text)
            if not (text or calls or output.logprobs):
                return ""
            return self._delta(output, text or None, calls)
        if not self._continuous and output.logprobs is None:
            return self._spliced(output.text)
        return self._delta(output, output.text)

    def _delta(self, output: GenerationOutput, text: str | None, calls: list[CallDelta] = ()) -> str:
        logprobs = self._service.chat_logprobs(self._request, output.logprobs or [])
        tool_calls = [ToolCallDelta(index=call.index, id=call.id, type="function" if call.id else None,
                                    function=FunctionCallDelta(name=call.name, arguments=call.arguments))
                      for call in calls] or None
        return self._line([ChunkChoice(delta=Delta(content=text, tool_calls=tool_calls), logprobs=logprobs)],
                          self._so_far(output))

    def finish(self, output: GenerationOutput) -> str:
        reason, held = output.finish_reason, ""
        if self._calls is not None:
            if text := self._calls.flush():
                held = self._line([ChunkChoice(delta=Delta(content=text))], self._so_far(output))
            reason = self._tools.finish_reason(reason, self._calls.calls > 0)
        return held + self._line([ChunkChoice(delta=Delta(), finish_reason=reason)],
                                 self._so_far(output))


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
        return self._line([TextChoice(text=output.text, logprobs=logprobs)], self._so_far(output))

    def finish(self, output: GenerationOutput) -> str:
        return self._line([TextChoice(text="", finish_reason=output.finish_reason)],
                          self._so_far(output))
