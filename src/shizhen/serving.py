"""The chat service: OpenAI chat requests in, engine requests through, OpenAI responses and SSE chunks out.

Knows nothing of FastAPI; every check that can refuse a request runs here, before anything reaches the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel

from .config import Settings
from .engine.engine import Engine, EngineState
from .engine.prompt import ChatTurn, Part, PromptBuilder, PromptInputs
from .engine.request import EngineFailure, GenerationRequest, RequestStream
from .engine.sampling import SamplingParams
from .errors import InternalError, InvalidRequest, ModelNotFound, ServiceUnavailable
from .media import ImageIntake
from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    ImagePart,
    Usage,
    completion_id,
    now,
)

log = logging.getLogger(__name__)
RANDOM_MODEL_MARKER = "SHIZHEN_TINY_RANDOM_MODEL"
LOADING_RETRY_AFTER_S = 10


def is_random_test_model(model_source: str) -> bool:
    return (Path(model_source) / RANDOM_MODEL_MARKER).exists()


class ChatService:
    def __init__(self, settings: Settings, engine: Engine):
        self._settings = settings
        self._engine = engine
        self._prompt_builder: PromptBuilder | None = None
        self.images = ImageIntake(settings)

    # --- admission -----------------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self._settings.model_name:
            raise ModelNotFound(
                f"model {requested!r} does not exist; this server serves {self._settings.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def require_ready(self) -> None:
        engine = self._engine
        if engine.state is EngineState.LOADING:
            raise ServiceUnavailable(
                f"the model is loading ({engine.phase}); retry shortly", retry_after=LOADING_RETRY_AFTER_S
            )
        if engine.state is EngineState.FAILED:
            raise ServiceUnavailable(f"the model failed to load: {engine.error}", retry_after=60)

    async def prepare(self, body: ChatCompletionRequest, image_param: str | None = None) -> GenerationRequest:
        """Validate and preprocess a request into an engine request; raises ServingError for anything refused.

        `image_param` names the field images came from in errors, for endpoints whose body is not `messages`.
        """
        self.check_model(body.model)
        self.require_ready()
        turns = await self._turns(body.messages, image_param)
        prompt = await asyncio.to_thread(self._builder().build, turns)
        return GenerationRequest(completion_id(), prompt, self._sampling(body, prompt))

    def _builder(self) -> PromptBuilder:
        if self._prompt_builder is None:
            self._prompt_builder = PromptBuilder(
                self._engine.loaded.processor, self._settings.image_min_pixels, self._settings.image_max_pixels
            )
        return self._prompt_builder

    async def _turns(self, messages: list[ChatMessage], image_param: str | None) -> list[ChatTurn]:
        image_count = sum(
            isinstance(part, ImagePart) for m in messages if isinstance(m.content, list) for part in m.content
        )
        if image_count > self._settings.max_images_per_request:
            raise InvalidRequest(
                f"{image_count} images sent; at most {self._settings.max_images_per_request} per request",
                param="messages",
                code="too_many_images",
            )
        return [await self._turn(i, message, image_param) for i, message in enumerate(messages)]

    async def _turn(self, index: int, message: ChatMessage, image_param: str | None) -> ChatTurn:
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            if role != "assistant":
                raise InvalidRequest(f"{role} messages need content", param=f"messages[{index}].content")
            return ChatTurn(role, ("",))
        if isinstance(message.content, str):
            return ChatTurn(role, (message.content,))
        parts: list[Part] = []
        for j, part in enumerate(message.content):
            param = image_param or f"messages[{index}].content[{j}]"
            if not isinstance(part, ImagePart):
                parts.append(part.text)
            elif role != "user":
                raise InvalidRequest(f"images are only accepted in user messages, not {role}", param=param)
            else:
                parts.append(await self.images.load(part.image_url.url, param))
        return ChatTurn(role, tuple(parts))

    def _sampling(self, body: ChatCompletionRequest, prompt: PromptInputs) -> SamplingParams:
        settings = self._settings
        room = settings.max_context_length - prompt.num_tokens
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {prompt.num_tokens} tokens ({prompt.num_image_tokens} of them image tokens); "
                f"this server's context holds {settings.max_context_length} tokens. Shorten the conversation.",
                param="messages",
                code="context_length_exceeded",
            )
        requested = body.requested_max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if requested is not None and requested > settings.max_tokens_limit:
            raise InvalidRequest(f"{param} is {requested}; at most {settings.max_tokens_limit}", param=param)
        if requested is not None and requested > room:
            raise InvalidRequest(
                f"the prompt ({prompt.num_tokens} tokens) plus {param} ({requested}) exceeds the "
                f"{settings.max_context_length}-token context; lower {param} to at most {room}",
                param=param,
                code="context_length_exceeded",
            )
        defaults = self._engine.loaded.sampling_defaults
        return SamplingParams(
            max_new_tokens=requested if requested is not None else min(settings.default_max_tokens, room),
            temperature=_pick(body.temperature, defaults, "temperature", 1.0),
            top_p=_pick(body.top_p, defaults, "top_p", 1.0),
            top_k=int(_pick(body.top_k, defaults, "top_k", 0)),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=_pick(body.repetition_penalty, defaults, "repetition_penalty", 1.0),
            seed=body.seed,
            stop=tuple(body.stop),
            ignore_eos=body.ignore_eos,
        )

    # --- answering -----------------------------------------------------------------------------------------------
    async def complete(self, request: GenerationRequest) -> ChatCompletion:
        """Run to the end and answer in one `chat.completion`."""
        stream = self._engine.submit(request)
        texts: list[str] = []
        try:
            while True:
                output = await _next_or_fail(stream)
                texts.append(output.text)
                if output.finish_reason:
                    break
        finally:
            stream.cancel()
        return ChatCompletion(
            id=request.request_id,
            created=now(),
            model=self._settings.model_name,
            choices=[Choice(message=AssistantMessage(content="".join(texts)), finish_reason=output.finish_reason)],
            usage=_usage(request, output.completion_tokens),
        )

    async def stream(self, request: GenerationRequest, include_usage: bool) -> AsyncIterator[str]:
        """SSE lines: role chunk, content deltas, finish chunk, optional usage chunk, `[DONE]`.

        While no token is ready (queued, or a long prefill) a comment line keeps idle-timeout proxies from cutting
        the stream. Closing this generator (client gone) cancels the engine request.
        """
        stream = self._engine.submit(request)
        created = now()

        def chunk(delta: Delta, finish_reason: str | None = None) -> str:
            choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
            return _sse(ChatCompletionChunk(id=request.request_id, created=created, model=self._settings.model_name,
                                            choices=[choice]))

        try:
            yield chunk(Delta(role="assistant", content=""))
            while True:
                try:
                    output = await stream.next(timeout=self._settings.stream_heartbeat_seconds)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if output.text:
                    yield chunk(Delta(content=output.text))
                if output.finish_reason:
                    yield chunk(Delta(), output.finish_reason)
                    break
            if include_usage:
                yield _sse(ChatCompletionChunk(id=request.request_id, created=created, model=self._settings.model_name,
                                               choices=[], usage=_usage(request, output.completion_tokens)))
        except EngineFailure as exc:
            error = InternalError(f"generation failed: {exc}")
            yield _sse(ErrorResponse(error=ErrorBody(message=error.message, type=error.error_type, code="engine_error")))
        finally:
            stream.cancel()
        yield "data: [DONE]\n\n"


async def _next_or_fail(stream: RequestStream):
    try:
        return await stream.next()
    except EngineFailure as exc:
        raise InternalError(f"generation failed: {exc}", code="engine_error") from exc


def _pick(value: float | None, defaults: dict[str, float], name: str, fallback: float) -> float:
    if value is not None:
        return value
    return defaults.get(name, fallback)


def _usage(request: GenerationRequest, completion_tokens: int) -> Usage:
    prompt_tokens = request.prompt.num_tokens
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
