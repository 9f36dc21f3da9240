"""What goes into the engine and what comes out of it for one request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .prompt import PromptInputs
from .sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: PromptInputs
    sampling: SamplingParams
    arrived: float = field(default_factory=time.monotonic)  # when the client's request came in


@dataclass(frozen=True)
class GenerationOutput:
    """What arrived since the last output: the new text (whole characters, possibly empty) and the running token
    count."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" once finished
    # where asked for: per token of `text`, (token id, logprob, [(id, logprob) of the likeliest])
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache (known from the first)


class EngineFailure(Exception):
    """Generation of one request failed inside the engine; the engine itself keeps serving."""


class EngineDied(EngineFailure):
    """The engine process ended while the request ran; the server restarts it, so asking again will work."""
