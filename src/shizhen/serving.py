"""The chat service: OpenAI chat and text completion requests in, engine requests through, OpenAI responses and
SSE chunks out.

Knows nothing of FastAPI; every check that can refuse a request runs here, before anything reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from itertools import accumulate
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from .config import Settings
from .engine.client import EngineClient, EngineState, RequestStream
from .engine.prompt import ChatTurn, Part, PromptInputs
from .engine.request import EngineDied, EngineFailure, GenerationOutput, GenerationRequest
from .engine.sampling import SamplingParams
from .errors import (
    InternalError,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    RequestTimedOut,
    ServiceUnavailable,
    ServingError,
)
from .media import ImageIntake
from .observability.metrics import ServerMetrics
from .observability.requests import current_request
from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequestFields,
    Choice,
    ChoiceLogprobs,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    ErrorResponse,
    FunctionCall,
    ImagePart,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    TokenizeRequest,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    TokenizeResponse,
    Usage,
    completion_id,
    now,
)
from .streaming import ChunkShape, sse, usage_of
from .structured import GrammarChecks
from .tool_calls import ToolUse, call_text, new_call_id, parse, response_text, tools_system_text

log = logging.getLogger(__name__)
LOADING_RETRY_AFTER_S = 10
SHUTDOWN_CUT = "server_shutdown"  # the error code of answers cut when the grace period ends


class PromptFailed(Exception):
    """Building a prompt raised; carries the cause's name and message across the thread boundary."""


class ChatService:
    def __init__(self, settings: Settings, engine: EngineClient, metrics: ServerMetrics):
        self._settings = settings
        self._engine = engine
        self._metrics = metrics
        self.images = ImageIntake(settings, metrics)
        self.draining = False  # set on SIGTERM: finish what runs, take nothing new
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, from `start`
        # templates and tokenizers hold the GIL: a bounded pool keeps a flood of them from starving the event loop
        self._prompt_threads = ThreadPoolExecutor(settings.prompt_build_threads, thread_name_prefix="shizhen-prompt")
        self._grammars = GrammarChecks(self._prompt_threads)
        # accepted requests not yet in the engine's queue count as waiting too, so a burst cannot pass the limit
        self._preparing = 0
        self._unsubmitted: set[str] = set()
        self._live: set[RequestStream] = set()  # submitted and not yet ended

    def start(self) -> None:
        """On the server's event loop, before the first request."""
        self._loop = asyncio.get_running_loop()

    async def aclose(self) -> None:
        self._prompt_threads.shutdown(wait=False, cancel_futures=True)
        await self.images.aclose()

    # --- admission -----------------------------------------------------------------------------------------------
    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self._settings.model_name:
            raise ModelNotFound(
                f"model {requested!r} does not exist; this server serves {self._settings.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def require_ready(self) -> None:
        if self.draining:
            raise ServiceUnavailable("the server is shutting down; retry on another replica or shortly",
                                     retry_after=LOADING_RETRY_AFTER_S)
        engine = self._engine
        if engine.state is EngineState.LOADING:
            raise ServiceUnavailable(
                f"the model is loading ({engine.phase.detail}); retry shortly", retry_after=LOADING_RETRY_AFTER_S
            )
        if engine.state is EngineState.FAILED:
            raise ServiceUnavailable(f"the model failed to load: {engine.error}", retry_after=60)

    async def prepare(self, body: ChatCompletionRequest, image_param: str | None = None,
                      text_param: str | None = None) -> GenerationRequest:
        """Validate and preprocess a request into an engine request; raises ServingError for anything refused.

        `image_param` and `text_param` name the fields images and text came from in errors, for endpoints whose
        body is not `messages`. Checks that need no tokenizing come first.
        """
        async def chat_prompt() -> PromptInputs:
            if self._settings.log_message_contents:
                log.debug("request messages: %s", [m.model_dump() for m in body.messages])
            self._check_sizes(body.messages)
            turns = await self._turns(body.messages, image_param, text_param, body.tools_in_use)
            return await self._build_prompt(turns)

        return await self._admit(body, chat_prompt, "messages", completion_id())

    async def prepare_text(self, body: CompletionRequest) -> GenerationRequest:
        """A text completion's raw prompt: text through the tokenizer alone (special tokens are the caller's to
        write), or token ids as they are."""
        async def raw_prompt() -> PromptInputs:
            builder = self._engine.prompt_builder
            if isinstance(body.prompt, str):
                if len(body.prompt.encode("utf-8", "surrogatepass")) // builder.max_token_bytes >= \
                        self._settings.max_context_length:
                    raise InvalidRequest(f"the prompt is more than this server's {self._settings.max_context_length}"
                                         "-token context holds. Shorten it.", param="prompt",
                                         code="context_length_exceeded")
                self._plain_text_encoding(body.prompt, "prompt")
                tokens = await self._loop.run_in_executor(self._prompt_threads, builder.encode, body.prompt)
            else:
                tokens = self._in_vocabulary(body.prompt, "prompt")
            return builder.from_token_ids(tokens)

        return await self._admit(body, raw_prompt, "prompt", f"cmpl-{uuid.uuid4().hex}")

    async def _admit(self, body: GenerationRequestFields, build_prompt, prompt_param: str,
                     request_id: str) -> GenerationRequest:
        """What every generation request goes through: model, readiness, capacity, the prompt, sampling."""
        arrived = time.monotonic()
        self.check_model(body.model)
        self.require_ready()
        queued = self._engine.queued + self._preparing + len(self._unsubmitted)
        if queued >= self._settings.max_waiting_requests:
            raise RateLimited(f"the server is at capacity ({queued} requests waiting); retry shortly",
                              code="server_overloaded", retry_after=2)
        record = current_request.get()
        if record is not None:
            record.model = self._settings.model_name
        self._preparing += 1
        try:
            grammar = await self._grammars.grammar_for(body)
            prompt = await build_prompt()
            request = GenerationRequest(request_id, prompt, self._sampling(body, prompt, prompt_param, grammar),
                                        arrived=arrived)
        finally:
            self._preparing -= 1
        self._unsubmitted.add(request.request_id)  # until submitted, or dropped unanswered (a vanished client)
        weakref.finalize(request, self._unsubmitted.discard, request.request_id)
        return request

    def _check_sizes(self, messages: list[ChatMessage]) -> None:
        """Refuse, from sizes alone, too many images and a conversation whose prompt cannot fit the context: every
        message is at least one token, text at least one token per `max_token_bytes` bytes, an image at least its
        smallest size's tokens. Tokenizing 50,000 messages only to refuse them would hold a worker for seconds."""
        builder = self._engine.prompt_builder
        texts = [m.content if isinstance(m.content, str) else "".join(getattr(p, "text", "") for p in m.content)
                 for m in messages if m.content]
        images = sum(isinstance(p, ImagePart) for m in messages if isinstance(m.content, list) for p in m.content)
        if images > self._settings.max_images_per_request:
            raise InvalidRequest(f"{images} images sent; at most {self._settings.max_images_per_request} per request",
                                 param="messages", code="too_many_images")
        text_bytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        least = len(messages) + text_bytes // builder.max_token_bytes + images * builder.min_image_tokens
        if least >= self._settings.max_context_length:
            raise InvalidRequest(
                f"the conversation ({len(messages)} messages, {text_bytes} bytes of text, {images} images) is more "
                f"than this server's {self._settings.max_context_length}-token context holds. Shorten it.",
                param="messages", code="context_length_exceeded")

    async def _build_prompt(self, turns: list[ChatTurn], add_generation_prompt: bool = True) -> PromptInputs:
        try:
            return await self._loop.run_in_executor(self._prompt_threads, _build, self._engine.prompt_builder, turns,
                                                    add_generation_prompt)
        except PromptFailed as exc:
            raise InvalidRequest(f"the conversation could not be turned into a prompt: {exc}", param="messages",
                                 code="invalid_prompt") from None

    async def _turns(self, messages: list[ChatMessage], image_param: str | None, text_param: str | None,
                     tools: list = ()) -> list[ChatTurn]:
        """The messages as the engine's turns, tool calls and results written as Qwen2.5 writes them
        (tool_calls.py): calls in the assistant's text, consecutive results in one user turn, the tools' signatures
        in the system turn."""
        turns: list[ChatTurn] = []
        for i, message in enumerate(messages):
            turn = await self._turn(i, message, image_param, text_param)
            if message.role == "tool":
                result = response_text("".join(turn.parts))
                if i and messages[i - 1].role == "tool":
                    turns[-1] = ChatTurn("user", (turns[-1].parts[0] + "\n" + result,))
                    continue
                turn = ChatTurn("user", (result,))
            elif message.tool_calls:
                text = "".join(turn.parts)
                calls = "\n".join(call_text(call.function.name, json.loads(call.function.arguments))
                                  for call in message.tool_calls)
                turn = ChatTurn("assistant", ((text + "\n" if text else "") + calls,))
            turns.append(turn)
        if tools:
            signatures = [tool.model_dump(exclude_none=True) for tool in tools]
            if turns[0].role == "system":
                turns[0] = ChatTurn("system", (tools_system_text("".join(turns[0].parts), signatures),))
            else:
                turns.insert(0, ChatTurn("system", (tools_system_text(None, signatures),)))
        return turns

    async def _turn(self, index: int, message: ChatMessage, image_param: str | None,
                    text_param: str | None) -> ChatTurn:
        role = "system" if message.role == "developer" else message.role
        for j, call in enumerate(message.tool_calls or ()):
            self._plain_text(call.function.arguments, f"messages[{index}].tool_calls[{j}].function.arguments")
        if message.content is None:
            if role != "assistant":
                raise InvalidRequest(f"{role} messages need content", param=f"messages[{index}].content")
            return ChatTurn(role, ("",))
        if isinstance(message.content, str):
            return ChatTurn(role, (self._plain_text(message.content, text_param or f"messages[{index}].content"),))
        parts: list[Part] = []
        for j, part in enumerate(message.content):
            param = f"messages[{index}].content[{j}]"
            if not isinstance(part, ImagePart):
                parts.append(self._plain_text(part.text, text_param or param))
            elif role != "user":
                raise InvalidRequest(f"images are only accepted in user messages, not {role}",
                                     param=image_param or param)
            else:
                parts.append(await self.images.load(part.image_url.url, image_param or param))
        return ChatTurn(role, tuple(parts))

    def _plain_text(self, text: str, param: str) -> str:
        """User-supplied text stays text: no control tokens (they would forge turns or image slots), valid UTF-8."""
        if token := self._engine.prompt_builder.control_token_in(text):
            raise InvalidRequest(f"the text contains the control token {token!r}, which only the chat template may "
                                 "write; remove it", param=param, code="control_token_in_text")
        return self._plain_text_encoding(text, param)

    @staticmethod
    def _plain_text_encoding(text: str, param: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"the text is not valid Unicode (a lone surrogate at character {exc.start})",
                                 param=param) from None
        return text

    def _sampling(self, body: GenerationRequestFields, prompt: PromptInputs, prompt_param: str,
                  grammar: tuple[str, str] | None = None) -> SamplingParams:
        settings = self._settings
        room = settings.max_context_length - prompt.num_tokens
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {prompt.num_tokens} tokens ({prompt.num_image_tokens} of them image tokens); "
                f"this server's context holds {settings.max_context_length} tokens. Shorten the "
                f"{'conversation' if prompt_param == 'messages' else prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        requested = body.requested_max_tokens
        param = body.max_tokens_field
        if requested is not None and requested > settings.max_tokens_limit:
            raise InvalidRequest(f"{param} is {requested}; at most {settings.max_tokens_limit}", param=param)
        if requested is not None and requested > room:
            raise InvalidRequest(
                f"the prompt ({prompt.num_tokens} tokens) plus {param} ({requested}) exceeds the "
                f"{settings.max_context_length}-token context; lower {param} to at most {room}",
                param=param,
                code="context_length_exceeded",
            )
        max_new_tokens = requested if requested is not None else min(settings.default_max_tokens, room)
        if body.min_tokens > max_new_tokens:
            raise InvalidRequest(f"min_tokens ({body.min_tokens}) is more than the answer may have "
                                 f"({max_new_tokens} tokens)", param="min_tokens")
        self._in_vocabulary(body.stop_token_ids, "stop_token_ids")
        biases = body.token_biases
        self._in_vocabulary(list(biases), "logit_bias")
        defaults = self._engine.info.sampling_defaults
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=_pick(body.temperature, defaults, "temperature", 1.0),
            top_p=_pick(body.top_p, defaults, "top_p", 1.0),
            top_k=int(_pick(body.top_k, defaults, "top_k", 0)),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=_pick(body.repetition_penalty, defaults, "repetition_penalty", 1.0),
            seed=body.seed,
            stop=tuple(body.stop),
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            min_p=body.min_p,
            stop_token_ids=tuple(body.stop_token_ids),
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=body.logprobs_asked,
            logit_bias=tuple(biases.items()),
            grammar=grammar,
        )

    # --- tokenizing (vLLM's /tokenize and /detokenize) --------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """A chat goes through exactly the path a chat completion's prompt does (checks, images, template); a plain
        prompt through the tokenizer alone."""
        self.check_model(body.model)
        self.require_ready()
        builder = self._engine.prompt_builder
        if body.messages is not None:
            self._check_sizes(body.messages)
            turns = await self._turns(body.messages, None, None, body.tools or [])
            prompt = await self._build_prompt(turns, body.add_generation_prompt)
            tokens = prompt.input_ids[0].tolist()
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = await self._loop.run_in_executor(self._prompt_threads, builder.encode, body.prompt, add_special)
        return TokenizeResponse(count=len(tokens), max_model_len=self._settings.max_context_length, tokens=tokens,
                                token_strs=builder.token_strings(tokens) if body.return_token_strs else None)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        self.require_ready()
        return DetokenizeResponse(prompt=self._engine.prompt_builder.decode(self._in_vocabulary(body.tokens,
                                                                                                "tokens")))

    def _in_vocabulary(self, token_ids: list[int], param: str) -> list[int]:
        vocab_size = self._engine.prompt_builder.vocab_size
        if bad := [token for token in token_ids if not 0 <= token < vocab_size]:
            raise InvalidRequest(f"token id {bad[0]} is not in this model's vocabulary (0 to {vocab_size - 1})",
                                 param=param)
        return token_ids

    # --- answering -----------------------------------------------------------------------------------------------
    async def complete(self, request: GenerationRequest, tools: ToolUse | None = None) -> ChatCompletion:
        """Run to the end and answer in one `chat.completion`; with `tools`, calls in the text become
        `tool_calls`."""
        text, output, logprobs = await self._answer(request)
        content, calls = parse(text, tools.names) if tools else (text, [])
        message = AssistantMessage(content=content, tool_calls=[
            ToolCall(id=new_call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
            for call in calls])
        finish_reason = tools.finish_reason(output.finish_reason, bool(calls)) if tools else output.finish_reason
        return ChatCompletion(
            id=request.request_id,
            created=now(),
            model=self._settings.model_name,
            choices=[Choice(message=message, finish_reason=finish_reason,
                            logprobs=self.chat_logprobs(request, logprobs))],
            usage=usage_of(request, output),
        )

    async def complete_text(self, request: GenerationRequest) -> TextCompletion:
        """Run to the end and answer in one `text_completion`."""
        text, output, logprobs = await self._answer(request)
        return TextCompletion(
            id=request.request_id,
            created=now(),
            model=self._settings.model_name,
            choices=[TextChoice(text=text, finish_reason=output.finish_reason,
                                logprobs=self.text_logprobs(request, logprobs))],
            usage=usage_of(request, output),
        )

    async def _answer(self, request: GenerationRequest) -> tuple[str, GenerationOutput, list]:
        """The whole text, the last output (finish reason, token count) and every token's logprobs entry."""
        texts: list[str] = []
        logprobs: list = []
        try:
            async with aclosing(self._outputs(request)) as outputs:
                async for output in outputs:
                    texts.append(output.text)
                    logprobs += output.logprobs or []
        except EngineFailure as exc:
            raise _engine_error(exc) from exc
        return "".join(texts), output, logprobs

    def _named(self, token: int, logprob: float) -> dict:
        text, data = self._engine.prompt_builder.token_piece(token)
        return {"token": text, "logprob": logprob, "bytes": data}

    def chat_logprobs(self, request: GenerationRequest, entries: list) -> ChoiceLogprobs | None:
        """The engine's (token, logprob, likeliest) entries in OpenAI's chat shape, where the request asked."""
        if request.sampling.logprobs is None:
            return None
        named = self._named
        return ChoiceLogprobs(content=[
            TokenLogprob(**named(token, logprob), top_logprobs=[TopLogprob(**named(*top)) for top in likeliest])
            for token, logprob, likeliest in entries])

    def text_logprobs(self, request: GenerationRequest, entries: list, offset: int = 0) -> TextLogprobs | None:
        """The same in the legacy completions' shape; `offset`: where these tokens' text starts in the answer."""
        if request.sampling.logprobs is None:
            return None
        piece = self._engine.prompt_builder.token_piece
        texts = [piece(token)[0] for token, _, _ in entries]
        offsets = list(accumulate(map(len, texts[:-1]), initial=offset))[: len(texts)]
        return TextLogprobs(tokens=texts, token_logprobs=[logprob for _, logprob, _ in entries],
                            top_logprobs=[{piece(top)[0]: value for top, value in likeliest}
                                          for _, _, likeliest in entries], text_offset=offsets)

    async def stream(self, request: GenerationRequest, shape: type[ChunkShape], include_usage: bool,
                     continuous_usage: bool = False, tools: ToolUse | None = None) -> AsyncIterator[str]:
        """SSE lines in `shape` (ChatChunks or TextChunks): its opening, content deltas, the finish chunk, the
        usage chunk if asked for, `[DONE]`; an error after the start comes as an error chunk before `[DONE]`.
        `continuous_usage` (with include_usage): every chunk carries the usage so far.

        While no token is ready (queued, or a long prefill) a comment line keeps idle-timeout proxies from cutting
        the stream. Closing this generator (client gone) cancels the engine request.
        """
        chunks = shape(self, request, self._settings.model_name, include_usage and continuous_usage, tools)
        for line in chunks.opening():
            yield line
        try:
            async with aclosing(self._outputs(request, self._settings.stream_heartbeat_seconds)) as outputs:
                async for output in outputs:
                    if output is None:
                        yield ": keep-alive\n\n"
                        continue
                    if (output.text or output.logprobs) and (line := chunks.content(output)):
                        yield line
                    if output.finish_reason:
                        yield chunks.finish(output)
                        if include_usage:
                            yield chunks.usage(output)
        except (EngineFailure, ServingError) as exc:
            error = exc if isinstance(exc, ServingError) else _engine_error(exc)
            yield sse(ErrorResponse(error=ErrorBody(message=error.message, type=error.error_type, code=error.code)))
        yield "data: [DONE]\n\n"

    async def _outputs(self, request: GenerationRequest, heartbeat: float | None = None):
        """The engine's outputs for one request, with the request timeout, metrics and the log record kept.

        Yields None whenever `heartbeat` seconds pass without output. Closing it cancels the engine request, so
        callers hold it in `aclosing`: an abandoned async generator is only closed when garbage collection gets to
        it, and until then the GPU would keep generating for a client that is gone.
        """
        timeout = self._settings.request_timeout_seconds
        deadline = request.arrived + timeout
        metrics, record = self._metrics, current_request.get()
        stream = self._engine.submit(request)
        self._unsubmitted.discard(request.request_id)  # the engine's queue counts it from here
        self._live.add(stream)
        last, counted = None, 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    output = await stream.next(timeout=max(min(remaining, heartbeat or remaining), 0))
                except ServiceUnavailable as exc:
                    if exc.code == SHUTDOWN_CUT and record is not None:
                        record.finish_reason = "cut_at_shutdown"
                    raise
                except TimeoutError:
                    if time.monotonic() < deadline:
                        if heartbeat:
                            yield None
                        continue
                    raise RequestTimedOut(f"the generation was stopped at the {timeout:g} s request timeout",
                                          code="request_timeout") from None
                arrived_at = time.monotonic()
                # an output carries every token since the last: one gap each, the time shared among them (those
                # that came with the first token came with no gap)
                new_tokens = output.completion_tokens - counted
                if last is None:
                    metrics.time_to_first_token.observe(arrived_at - request.arrived)
                    if record is not None:
                        record.ttft_ms = round((arrived_at - request.arrived) * 1e3, 1)
                    gaps = [0.0] * (new_tokens - 1)
                else:
                    gaps = [(arrived_at - last) / new_tokens] * new_tokens
                for gap in gaps:
                    metrics.inter_token_latency.observe(gap)
                last, counted = arrived_at, output.completion_tokens
                if output.finish_reason:
                    self._finished(request, output, arrived_at)
                yield output
                if output.finish_reason:
                    return
        finally:
            stream.cancel()
            self._live.discard(stream)

    def cut_running(self) -> None:
        """Thread-safe, for the end of the shutdown grace period: every answer still running ends now, a stream
        with an error chunk and `[DONE]`, a plain request with a 503."""
        def cut() -> None:
            error = ServiceUnavailable("the server shut down before this answer was finished; ask again",
                                       code=SHUTDOWN_CUT, retry_after=LOADING_RETRY_AFTER_S)
            for stream in list(self._live):
                stream.abort(error)
        self._loop.call_soon_threadsafe(cut)

    def _finished(self, request: GenerationRequest, output: GenerationOutput, at: float) -> None:
        metrics = self._metrics
        metrics.e2e_latency.observe(at - request.arrived)
        metrics.prompt_tokens.inc(request.prompt.num_tokens)
        metrics.generation_tokens.inc(output.completion_tokens)
        metrics.request_success.labels(output.finish_reason).inc()
        record = current_request.get()
        if record is not None:
            record.prompt_tokens = request.prompt.num_tokens
            record.completion_tokens = output.completion_tokens
            record.finish_reason = output.finish_reason


def _build(builder, turns: list[ChatTurn], add_generation_prompt: bool) -> PromptInputs:
    """Runs on a prompt thread. Every exception leaves as PromptFailed: a StopIteration raised into the awaiting
    Future would never reach the coroutine, leaving the request without an answer for good."""
    try:
        return builder.build(turns, add_generation_prompt)
    except Exception as exc:
        raise PromptFailed(f"{type(exc).__name__}: {exc}") from None


def _engine_error(exc: EngineFailure) -> ServingError:
    """An engine that died (and is restarting) is worth retrying: 503; a request that failed on its own: 500."""
    if isinstance(exc, EngineDied):
        return ServiceUnavailable(str(exc), code="engine_restarting", retry_after=LOADING_RETRY_AFTER_S)
    return InternalError(f"generation failed: {exc}", code="engine_error")


def _pick(value: float | None, defaults: dict[str, float], name: str, fallback: float) -> float:
    if value is not None:
        return value
    return defaults.get(name, fallback)
