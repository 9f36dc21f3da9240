"""The API process's one handle on the engine: starts the engine process, hands it requests, streams their outputs
back, and restarts it when it dies.

Everything outside `engine/` goes through `EngineClient`: its state (loading, ok, failed) and phase, what the engine
said about itself when ready (`info`), its counters (`stats`, refreshed with every step), the prompt builder (loaded
here from the checkpoint the engine loaded), `submit` and `abort`. It runs on the event loop; nothing here uses
the GPU (the engine process owns it).

Supervision: an engine process that ends after it was ready (killed, or a CUDA fault) fails the requests it was
running with a clear error and is replaced by a new one, which loads from the (verified) model cache; /health says
"loading" meanwhile. More than `max_restarts` ends in a row, each within RESTART_WINDOW_S of the last start,
or a start-up that fails, leave the engine failed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import zmq
import zmq.asyncio

from .. import load_phase
from ..load_phase import LoadPhase
from . import wire
from .core import EngineConfig
from .core_process import run_engine_process
from .detokenizer import TextAssembler
from .loader import LoadedModel
from .prompt import PromptBuilder
from .request import EngineDied, EngineFailure, GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)
RESTART_WINDOW_S = 600  # an engine that served this long before it ended starts the count of ends in a row anew
STOP_TIMEOUT_S = 10


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ok"
    FAILED = "failed"


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process reports once ready."""

    device: str
    dtype: str
    slots: int  # sequences that can run at once
    max_len: int  # tokens per sequence
    kv_capacity_tokens: int
    cuda_graphs: bool
    sampling_defaults: dict[str, float]
    folder: str  # the checkpoint it loaded
    load_seconds: float


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of the KV cache held by running sequences (0-1)
    # counters since the server started, every engine process's added up
    preemptions: int = 0
    tokens_generated: int = 0
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found
    image_cache_hits: int = 0  # images whose vision-tower output was cached
    image_cache_misses: int = 0
    gpu_memory: dict[str, dict[str, float]] = field(default_factory=dict)


COUNTERS = ("preemptions", "tokens_generated", "prefix_queried_tokens", "prefix_hit_tokens", "image_cache_hits",
            "image_cache_misses")


class RequestStream:
    """One request's outputs, from the engine's step messages to the coroutine answering it.

    The engine's token batches queue here; `next` takes all that arrived and turns them into one output (text and
    stop strings are made here, on the consumer's side). `cancel` (client gone, timeout, stop string) aborts the
    engine's request unless the engine already ended it.
    """

    def __init__(self, request: GenerationRequest, assembler: TextAssembler, abort: Callable[[str], None]):
        self.request = request
        self._assembler = assembler
        self._abort = abort
        self._items: deque[tuple[list[int], str | None, list | None] | Exception] = deque()
        self._arrived = asyncio.Event()
        self._engine_done = False  # the engine ended it, or was told to
        self.has_output = False
        self.cached_tokens: int | None = None  # prompt tokens found in the engine's prefix cache

    # --- the engine's side -----------------------------------------------------------------------------------------
    def put(self, tokens: list[int], finish_reason: str | None, logprobs: list | None = None,
            cached_tokens: int | None = None) -> None:
        self.has_output = True
        self.cached_tokens = cached_tokens if cached_tokens is not None else self.cached_tokens
        self._engine_done = self._engine_done or finish_reason is not None
        self._items.append((tokens, finish_reason, logprobs))
        self._arrived.set()

    def fail(self, error: Exception) -> None:
        self._engine_done = True
        self._items.append(error)
        self._arrived.set()

    # --- the consumer's side ---------------------------------------------------------------------------------------
    async def next(self, timeout: float | None = None) -> GenerationOutput:
        """The next output; raises TimeoutError (nothing lost) if none arrives in time, EngineFailure on failure."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that lands just as an
        # output arrives, and a disconnected client's generation would then run to the end
        async with asyncio.timeout(timeout):
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
        tokens: list[int] = []
        logprobs: list | None = None
        finish_reason = None
        while self._items and finish_reason is None:
            item = self._items[0]
            if isinstance(item, Exception):
                if tokens:
                    break  # the tokens before it first
                self._items.popleft()
                raise item
            self._items.popleft()
            tokens += item[0]
            finish_reason = item[1]
            if item[2] is not None:
                logprobs = (logprobs or []) + item[2]
        try:
            output = replace(self._assembler.feed(tokens, finish_reason, logprobs), cached_tokens=self.cached_tokens)
        except Exception as exc:  # detokenizing: this request's own failure only
            log.exception("turning the tokens of request %s into text failed", self.request.request_id)
            self.cancel()
            raise EngineFailure(f"{type(exc).__name__}: {exc}") from None
        if output.finish_reason:
            self.cancel()  # a stop string: the engine would run on
        return output

    def cancel(self) -> None:
        if not self._engine_done:
            self._engine_done = True
            self._abort(self.request.request_id)

    def abort(self, error: Exception) -> None:
        """End the request now (the shutdown's grace period is over); the consumer's `next` raises `error`."""
        self.cancel()
        self._items.append(error)
        self._arrived.set()


class EngineClient:
    def __init__(self, load: Callable[[Callable[[LoadPhase], None]], LoadedModel], config: EngineConfig,
                 max_restarts: int = 3):
        """`load(report_phase)` builds the model in the engine process; it may call `report_phase(LoadPhase(...))`."""
        self._load = load
        self.config = config
        self._max_restarts = max_restarts
        self.state = EngineState.LOADING
        self.phase = LoadPhase(load_phase.STARTING, "starting")
        self.error: str | None = None
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self.prompt_builder: PromptBuilder | None = None  # conversations → this model's inputs, loaded once
        self.restarts = 0  # engine processes replaced since start
        self._counted_before = EngineStats()  # the counters of engine processes that ended: they add up
        self._ends_in_a_row = 0
        self._live: dict[str, RequestStream] = {}  # submitted, and not yet ended by the engine or aborted
        self._incarnation = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._ready_at: float | None = None
        self._last_failure: str | None = None
        self._stopping = False
        self._reader: asyncio.Task | None = None
        self._folder: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the sockets and start the first engine process; returns at once (loading goes on there)."""
        self._loop = asyncio.get_running_loop()
        self._dir = tempfile.mkdtemp(prefix="shizhen-engine-")
        self._context = zmq.asyncio.Context()
        self._to_engine = self._context.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)
        self._to_engine.bind(f"ipc://{self._dir}/requests")
        self._from_engine = self._context.socket(zmq.PULL)
        self._from_engine.setsockopt(zmq.RCVHWM, 0)
        self._from_engine.bind(f"ipc://{self._dir}/outputs")
        self._reader = asyncio.create_task(self._read())
        self._spawn()

    async def stop(self) -> None:
        """Tell the engine process to stop (what it still runs fails with "shutting down") and wait for it."""
        self._stopping = True
        process = self._process
        if process is not None and process.is_alive():
            self._send(wire.SHUTDOWN)
            await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning("the engine process did not stop within %d s; killing it", STOP_TIMEOUT_S)
                process.kill()
                await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
        self._fail_live(EngineFailure("the server is shutting down"))
        if self._reader is not None:
            self._reader.cancel()
        self._to_engine.close(linger=0)
        self._from_engine.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _spawn(self) -> None:
        self._incarnation += 1
        self._ready_at = None
        self._last_failure = None
        # Where there is no GPU (tests, the CPU demo): fork, so the engine process starts in a second with the code
        # (and test patches) of this one. Where there is one: spawn, because a forked child cannot use CUDA once
        # this process has touched the driver, and importing xgrammar (for grammar checks) does. The warning
        # Python 3.12 gives for forking a multithreaded process is about locks the child could inherit held; the
        # child takes none of ours.
        start_method = "spawn" if torch.cuda.is_available() else "fork"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            process = multiprocessing.get_context(start_method).Process(
                target=run_engine_process, name=f"shizhen-engine-{self._incarnation}", daemon=True,
                args=(self._load, self.config, f"ipc://{self._dir}/requests", f"ipc://{self._dir}/outputs",
                      self._incarnation, os.getpid()))
            process.start()
        self._process = process
        self._loop.add_reader(process.sentinel, self._on_exit, process)
        log.info("engine process %d started (pid %d)", self._incarnation, process.pid)

    def _on_exit(self, process) -> None:
        self._loop.remove_reader(process.sentinel)
        process.join()
        if self._stopping or process is not self._process:
            return
        code = process.exitcode
        cause = f"exit code {code}" + (f": {self._last_failure}" if self._last_failure else "")
        self._counted_before = self.stats = EngineStats(**{name: getattr(self.stats, name) for name in COUNTERS})
        if self._ready_at is None:  # it never served: a start-up that fails would fail again
            self._fail_live(EngineFailure(f"the engine failed to start ({cause})"))
            if self.state is not EngineState.FAILED:
                self._give_up(self._last_failure or f"the engine process ended while loading ({cause})")
            return
        self._fail_live(EngineDied(f"the engine stopped ({cause}) while generating this answer; it is being "
                                   "restarted, ask again shortly"))
        if time.monotonic() - self._ready_at > RESTART_WINDOW_S:
            self._ends_in_a_row = 0
        self._ends_in_a_row += 1
        if self._ends_in_a_row > self._max_restarts:
            self._give_up(f"the engine process died {self._ends_in_a_row} time(s) in a row, more than "
                          f"SHIZHEN_ENGINE_MAX_RESTARTS={self._max_restarts} allows (last: {cause})")
            return
        log.error("the engine process ended (%s); starting a new one (%d of at most %d in a row)", cause,
                  self._ends_in_a_row, self._max_restarts)
        self.restarts += 1
        self.state = EngineState.LOADING
        self.phase = LoadPhase(load_phase.RESTARTING, f"restarting the engine, which ended ({cause})")
        self._spawn()

    def _give_up(self, error: str) -> None:
        log.error("the engine failed: %s", error)
        self.error = error
        self.state = EngineState.FAILED

    # --- requests ------------------------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Hand a request to the engine (call from the event loop); outputs arrive on the returned stream."""
        if self.state is not EngineState.READY:  # it died after the request was accepted
            raise EngineDied(f"the engine is {self.state.value} ({self.error or self.phase.detail}); ask again shortly")
        assembler = TextAssembler(self.prompt_builder.tokenizer, request.sampling)
        stream = RequestStream(request, assembler, self.abort)
        self._live[request.request_id] = stream
        payload, frames = wire.encode_request(request)
        self._send(wire.ADD, payload, frames)
        return stream

    def abort(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self._send(wire.ABORT, [request_id])

    @property
    def unfinished(self) -> int:
        """Requests the engine has not ended yet."""
        return len(self._live)

    @property
    def queued(self) -> int:
        """Submitted requests without a first token yet: queued in the engine, or being prefilled."""
        return sum(not stream.has_output for stream in self._live.values())

    def _send(self, kind: str, payload=None, frames: list = ()) -> None:
        self._to_engine.send_multipart([wire.pack(self._incarnation, kind, payload), *frames], copy=False)

    def _fail_live(self, error: EngineFailure) -> None:
        live, self._live = self._live, {}
        for stream in live.values():
            stream.fail(error)

    # --- the engine's messages -------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            data = await self._from_engine.recv()
            try:
                incarnation, kind, payload = wire.unpack(data)
                if incarnation == self._incarnation:
                    await self._handle(kind, payload)
            except Exception:
                log.exception("a message from the engine could not be handled")

    async def _handle(self, kind: str, payload) -> None:
        if kind == wire.OUTPUTS:
            outputs, stats = payload
            for request_id, tokens, finish_reason, error, logprobs, cached_tokens in outputs:
                stream = self._live.get(request_id)
                if stream is None:
                    continue  # aborted meanwhile
                if error is not None:
                    del self._live[request_id]
                    stream.fail(EngineFailure(error))
                    continue
                stream.put(tokens, finish_reason, logprobs, cached_tokens)
                if finish_reason is not None:
                    del self._live[request_id]
            before = self._counted_before
            self.stats = EngineStats(**stats | {name: stats[name] + getattr(before, name) for name in COUNTERS})
        elif kind == wire.PHASE:
            self.phase = LoadPhase(*payload)
        elif kind == wire.READY:
            await self._ready(EngineInfo(**payload))
        elif kind == wire.FAILED:
            self._last_failure = payload
            if self._ready_at is None:
                self._give_up(payload)

    async def _ready(self, info: EngineInfo) -> None:
        if self.prompt_builder is None or info.folder != self._folder:
            self.phase = LoadPhase(load_phase.LOADING_PROCESSOR, "loading the processor")
            try:
                self.prompt_builder = await asyncio.to_thread(PromptBuilder.from_folder, info.folder,
                                                              self.config.image_min_pixels,
                                                              self.config.image_max_pixels)
            except Exception as exc:
                log.exception("loading the processor failed")
                self._give_up(f"loading the processor from {info.folder} failed: {type(exc).__name__}: {exc}")
                self._send(wire.SHUTDOWN)
                return
            self._folder = info.folder
        self.info = info
        self._ready_at = time.monotonic()
        self.phase = LoadPhase(load_phase.READY, "ready")
        self.state = EngineState.READY
