"""OpenAI request, response, stream-chunk and error shapes — nothing else.

Requests allow unknown fields (clients send many we do not use): each is logged once, then ignored. What we cannot
honour is refused with a 400 naming the field, never silently dropped. `null` means "omitted", as OpenAI's nullable
fields do.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

log = logging.getLogger(__name__)
_logged_ignored: set[str] = set()  # unknown request fields already logged (each once per process)


INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default limit


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


def _only_empty(cls, value: object, info: ValidationInfo) -> object:
    """For fields behind features not implemented yet: only their empty values are accepted, as anything else
    would be dropped without a word."""
    if value:
        raise ValueError(f"{info.field_name} is not supported by this server yet")
    return value


class GenerationRequestFields(_Lenient):
    """What chat and text completions share: sampling, stopping, streaming, and their checks."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # the sampler keeps seeds in int64
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks
    # vLLM's sampling extensions
    min_tokens: int = Field(0, ge=0)  # no stop token nor stop string ends the answer before this many tokens
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # drop tokens less likely than min_p times the likeliest
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)  # end at these too ("stop")
    include_stop_str_in_output: bool = False  # the stop string that ended the answer stays in it
    # accepted only as the no-op value: the feature behind it is not implemented yet
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_omitted(cls, data: object) -> object:
        if isinstance(data, dict):
            return {key: value for key, value in data.items()
                    if value is not None or key not in cls.model_fields or cls.model_fields[key].default is None}
        return data

    @model_validator(mode="after")
    def _log_ignored_fields(self):
        if new := set(self.model_extra or ()) - _logged_ignored:
            _logged_ignored.update(new)
            log.warning("request fields this server does not implement, ignored: %s", ", ".join(sorted(new)))
        return self

    _no_logit_bias = field_validator("logit_bias")(_only_empty)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send several requests for several answers")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: object) -> object:
        """`stop` may be one string, a list of them, or null."""
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if isinstance(stops, list) and len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if isinstance(stops, list) and any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def max_tokens_field(self) -> str:
        """The field the answer's length limit came from, for errors."""
        return "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_asked(self) -> int | None:
        """The engine's `logprobs`: None for none, else how many of the likeliest tokens to list with each."""
        return None

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(GenerationRequestFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # accepted only as the no-op values: the features behind them are not implemented yet
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    _no_tools = field_validator("tools")(_only_empty)

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value and value.get("type", "text") != "text":
            raise ValueError(f"response_format {value.get('type')!r} is not supported by this server yet (only "
                             "'text'); the answer would not be constrained")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | dict | None) -> str | dict | None:
        if value not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by this server yet")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequestFields):
    """The legacy text completion: a raw prompt (text, or token ids), no chat template."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)  # the likeliest tokens listed with each (OpenAI's limit)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    _no_echo_or_suffix = field_validator("echo", "suffix")(_only_empty)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request: send several requests for several prompts")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value

    @property
    def logprobs_asked(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Lenient):
    """vLLM's `/tokenize`: a chat (as the chat template renders it, images counted) or a plain prompt."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # chats: end with the assistant's turn opening, as a completion would
    add_special_tokens: bool | None = None  # prompts: the tokenizer's own (default yes); chats: the template's
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either `prompt` or `messages`")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int] = Field(min_length=1)


class DetokenizeResponse(BaseModel):
    prompt: str


# --- responses -------------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChoiceLogprobs | None = None


class TextLogprobs(BaseModel):
    """The legacy completions' logprobs: per token its text, log-probability, likeliest tokens and offset."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(BaseModel):
    """A `text_completion`: the whole answer, or (streamed) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _without_nulls(self) -> dict[str, str]:
        """OpenAI sends `{}` as the final delta, not nulls."""
        return {name: value for name in ("role", "content") if (value := getattr(self, name)) is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int
    random_test_model: bool
    description: str
    limits: dict[str, int]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- the tongue-analysis endpoint ------------------------------------------------------------------------------
DEFAULT_TONGUE_QUESTION = "请从中医角度解读这张舌苔。"


class VisionAnalyzeRequest(_Lenient):
    """`/v1/vision/analyze` as JSON; multipart forms carry the same fields with `image` as a file."""

    image: str = Field(min_length=1, description="base64 image bytes, a data: URL or an http(s) URL")
    question: str | None = None
    query: str | None = None  # the seed frontend's name for `question`
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stream: bool = False

    @property
    def asked(self) -> str:
        return (self.question or self.query or "").strip() or DEFAULT_TONGUE_QUESTION


class VisionAnalysis(BaseModel):
    analysis: str
    question: str
    model: str
    finish_reason: Literal["stop", "length"] | None
    usage: Usage
