"""What goes into the engine and what comes out of it, plus the thread-safe channel between the two."""

from __future__ import annotations

import asyncio
import threading
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
    """One step's result: the new text (whole characters, possibly empty) and the running token count."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" once finished


class EngineFailure(Exception):
    """Generation of one request failed inside the engine; the engine itself keeps serving."""


class RequestStream:
    """Carries one request's outputs from the engine's worker thread to the event loop that awaits them.

    The worker calls `put` (never blocks); the event loop awaits `next`. `cancel` — from a disconnect, a timeout or
    the consumer going away — is seen by the worker between decode steps, which frees the sequence at once.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[GenerationOutput | Exception] = asyncio.Queue()
        self._cancelled = threading.Event()

    # --- the worker's side -------------------------------------------------------------------------------------
    def put(self, item: GenerationOutput | EngineFailure) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- the event loop's side ---------------------------------------------------------------------------------
    async def next(self, timeout: float | None = None) -> GenerationOutput:
        """The next output; raises TimeoutError (nothing lost) if none arrives in time, EngineFailure on failure."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that lands just as an
        # output arrives, and a disconnected client's generation would then run to the end
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self._cancelled.set()

    def abort(self, error: Exception) -> None:
        """From the event loop: end the request now; its consumer's `next` raises `error`."""
        self._cancelled.set()
        self._queue.put_nowait(error)
