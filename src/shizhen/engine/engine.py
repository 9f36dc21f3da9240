"""The engine: owns the model on one worker thread and serves queued requests in arrival order.

The event loop only enqueues and awaits `RequestStream`s; it never touches the GPU, so `/health` and new requests
are answered while a long generation runs. Loading happens on the same thread at start, in the background.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from .loader import LoadedModel
from .request import EngineFailure, GenerationRequest, RequestStream
from .runner import SequenceRunner

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ok"
    FAILED = "failed"


class Engine:
    def __init__(self, load: Callable[[Callable[[str], None]], LoadedModel]):
        """`load(report_phase)` builds the model; it may call `report_phase("...")` to say what it is doing."""
        self._load = load
        self._pending: queue.Queue[RequestStream | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="shizhen-engine", daemon=True)
        self.state = EngineState.LOADING
        self.phase = "starting"
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self.load_seconds: float | None = None
        self._running: RequestStream | None = None
        self.tokens_generated = 0  # since start, all requests

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancels the running request and ends the worker after it; queued requests are dropped."""
        if self._running is not None:
            self._running.cancel()
        self._pending.put(None)
        self._thread.join(timeout)
        while not self._pending.empty():
            if (stream := self._pending.get_nowait()) is not None:
                stream.put(EngineFailure("the server is shutting down"))

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request (call from the event loop); outputs arrive on the returned stream."""
        if self.state is not EngineState.READY:
            raise RuntimeError("engine is not ready")
        stream = RequestStream(request, asyncio.get_running_loop())
        self._pending.put(stream)
        return stream

    @property
    def running(self) -> int:
        return int(self._running is not None)

    @property
    def waiting(self) -> int:
        return self._pending.qsize()

    def _work(self) -> None:
        if not self._load_model():
            return
        runner = SequenceRunner(self.loaded)
        while (stream := self._pending.get()) is not None:
            if stream.cancelled:
                continue
            self._running = stream
            try:
                finished = False
                for output in runner.run(stream.request, lambda: stream.cancelled):
                    stream.put(output)
                    self.tokens_generated += 1
                    finished = output.finish_reason is not None
                if not finished:  # whoever still listens must not wait forever
                    stream.put(EngineFailure("the request was cancelled"))
            except Exception as exc:  # one request failing must not take the engine down
                log.exception("generation failed for request %s", stream.request.request_id)
                _release_device_memory()
                stream.put(EngineFailure(f"{type(exc).__name__}: {exc}"))
            finally:
                self._running = None

    def _load_model(self) -> bool:
        started = time.perf_counter()
        self.phase = "loading model"
        try:
            self.loaded = self._load(self._report_phase)
        except Exception as exc:
            log.exception("model loading failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            return False
        self.load_seconds = time.perf_counter() - started
        self.phase = "ready"
        self.state = EngineState.READY
        log.info("model ready in %.1f s on %s (%s)", self.load_seconds, self.loaded.device, self.loaded.dtype)
        return True


    def _report_phase(self, phase: str) -> None:
        log.info("%s", phase)
        self.phase = phase


def _release_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
