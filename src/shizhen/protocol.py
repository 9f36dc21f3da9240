"""OpenAI request, response, stream-chunk and error shapes — nothing else.

Requests allow unknown fields (clients send many we do not use): each is logged once, then ignored. What we cannot
honour is refused with a 400 naming the field, never silently dropped. `null` means "omitted", as OpenAI's nullable
fields do.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from .tool_calls import ToolUse

log = logging.getLogger(__name__)
_logged_ignored: set[str] = set()  # unknown request fields already logged (each once per process)


INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default limit


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Exact(BaseModel):
    """Constraint objects: an unknown field in them would change the answer's shape, so it is refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back in the history
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.content is None:
            raise ValueError("a tool message needs content (the call's result)")
        for call in self.tool_calls or ():
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(f"the arguments of tool call {call.id!r} are not a JSON object")
        return self


_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # calls always follow `parameters` where a grammar constrains them


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Exact):
    name: str = Field("response", pattern=_NAME)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the answer always follows the schema: it is a grammar here, strict or not


class ResponseFormat(_Exact):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs `json_schema`")
        return self


class StructuredOutputs(_Exact):
    """vLLM's `structured_outputs`: exactly one constraint for the whole answer."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, min_length=1)  # EBNF (GBNF-style), as xgrammar reads it
    json_object: bool | None = None
    structural_tag: str | None = None
    # vLLM's options that describe what this server always does: JSON is compact, schemas admit no extra
    # properties, and there is no fallback to another grammar engine
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object", "structural_tag")
                 if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object, "
                             f"structural_tag (got {', '.join(n.rstrip('_') for n in given) or 'none'})")
        return self


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
    logit_bias: dict[str, float] | None = None  # token id (as a string) → added to its logit, -100 to 100
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's

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

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, biases: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (biases or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids; {token!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are from -100 to 100; {token} has {bias}")
        if biases and len(biases) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        return biases

    @field_validator("structured_outputs")
    @classmethod
    def _one_constraint(cls, outputs: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        response_format = info.data.get("response_format")
        if outputs is not None and response_format and response_format.type != "text":
            raise ValueError("send either response_format or structured_outputs, not both")
        return outputs

    @model_validator(mode="before")
    @classmethod
    def _no_fields_that_change_the_answer(cls, data: object) -> object:
        """Fields this server does not implement and whose absence would change the answer: refused, naming what
        to use instead (other unknown fields are logged and ignored)."""
        if not isinstance(data, dict):
            return data
        if guided := sorted(k for k in data if k.startswith("guided_")):
            raise ValueError(f"{guided[0]} is not supported: use structured_outputs (json, regex, choice, grammar)")
        for legacy in ("functions", "function_call"):
            if data.get(legacy):
                raise ValueError(f"{legacy} is not supported: use tools and tool_choice")
        if data.get("audio") or any(m != "text" for m in data.get("modalities") or ()):
            raise ValueError("this model answers in text only (modalities: [\"text\"])")
        return data

    @property
    def token_biases(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}

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
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same name")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, choice, info: ValidationInfo):
        if choice == "required" or isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in info.data.get("tools") or ()]
            if not names:
                raise ValueError("tool_choice required or a named function needs `tools`")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
            response_format = info.data.get("response_format")
            if info.data.get("structured_outputs") is not None or (response_format and response_format.type != "text"):
                raise ValueError("a forced tool call and response_format/structured_outputs cannot both "
                                 "constrain the answer")
        return choice

    @property
    def tools_in_use(self) -> list[Tool]:
        """The tools the model is told about: none where tool_choice is "none"."""
        return [] if self.tool_choice == "none" else list(self.tools or ())

    @property
    def tool_use(self) -> ToolUse | None:
        """How the answer is read back: None where no tool can be called."""
        tools = self.tools_in_use
        if not tools:
            return None
        return ToolUse(frozenset(tool.function.name for tool in tools), named=isinstance(self.tool_choice,
                                                                                        NamedToolChoice))

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
    tools: list[Tool] | None = None  # chats: rendered into the prompt as a chat completion renders them
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


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
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


class _WithoutNulls(BaseModel):
    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize) -> dict:
        """OpenAI sends `{}` as the final delta, and only the parts of a call that came, not nulls."""
        return {name: value for name, value in serialize(self).items() if value is not None}


class FunctionCallDelta(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_WithoutNulls):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(_WithoutNulls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
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
    response_format: ResponseFormat | None = None  # e.g. a JSON schema for a structured tongue report

    @field_validator("response_format", mode="before")
    @classmethod
    def _json_text_in_forms(cls, value: object) -> object:
        """A multipart form carries the object as JSON text."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("response_format must be a JSON object") from None
        return value

    @property
    def asked(self) -> str:
        return (self.question or self.query or "").strip() or DEFAULT_TONGUE_QUESTION


class VisionAnalysis(BaseModel):
    analysis: str
    question: str
    model: str
    finish_reason: Literal["stop", "length"] | None
    usage: Usage
