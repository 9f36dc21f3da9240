"""The engine: owns the model on one worker thread and runs every request in one continuously batched loop.

Each step is: take new requests → drop cancelled ones → prefill admissions (they join the running batch) →
give sequences that fill their last KV block one more (preempting the newest when none is free) → launch one decode
step for the whole batch → handle the previous step's tokens while this one runs on the GPU.
Decode feeds the sampled tokens back on the device, so the host's per-token work (detokenizing, stop strings,
streaming) overlaps the next step instead of stalling it; a sequence that finished is simply dropped from the
step already in flight. The event loop only enqueues and awaits `RequestStream`s; it never touches the GPU.
Loading, memory planning and graph capture happen on the same thread at start, in the background.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .allocation import BLOCK_SIZE
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .loader import LoadedModel
from .memory import plan_blocks
from .model_runner import DecodeRow, ModelRunner
from .prompt import PromptBuilder
from .request import EngineFailure, GenerationRequest, RequestStream
from .sampling import BatchSampler, SlotHistory
from .scheduler import Admission, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ok"
    FAILED = "failed"


@dataclass
class InFlightStep:
    """A launched prefill or decode step: which sequences it sampled for and where their tokens land on the host."""

    sequences: list[Sequence]
    tokens: torch.Tensor  # host copy, filled asynchronously
    done: torch.cuda.Event | None


def _in_flight(sequences: list[Sequence], tokens: torch.Tensor) -> InFlightStep:
    """Queue the copy of `tokens` (on the device) to the host and mark when it has landed."""
    on_gpu = tokens.device.type == "cuda"
    host = torch.empty(len(sequences), dtype=torch.long, pin_memory=on_gpu)
    host.copy_(tokens, non_blocking=on_gpu)
    done = torch.cuda.Event() if on_gpu else None
    if done is not None:
        done.record()
    return InFlightStep(sequences, host, done)


@dataclass(frozen=True)
class EngineConfig:
    max_len: int  # prompt + completion tokens per sequence (the context length)
    image_min_pixels: int  # images are resized into this range before the vision tower
    image_max_pixels: int
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.92
    enforce_eager: bool = False  # no CUDA graphs: slower, but debuggable
    kv_cache_tokens: int | None = None  # at most this much KV cache, whatever memory planning allows
    prefill_token_budget: int = 8192  # prompt tokens prefilled between two decode steps (at least one prompt)


class Engine:
    def __init__(self, load: Callable[[Callable[[str], None]], LoadedModel], config: EngineConfig):
        """`load(report_phase)` builds the model; it may call `report_phase("...")` to say what it is doing."""
        self._load = load
        self.config = config
        self._incoming: queue.Queue[RequestStream | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="shizhen-engine", daemon=True)
        self._stopping = False
        self.state = EngineState.LOADING
        self.phase = "starting"
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self.prompt_builder: PromptBuilder | None = None  # CPU-side: conversations → this model's inputs
        self.load_seconds: float | None = None
        self.slots = 0  # sequences that can run at once (max_num_seqs)
        self.kv_blocks = 0
        self.tokens_generated = 0  # since start, all requests
        self.preemptions = 0  # since start: sequences that gave their KV blocks back to be recomputed later
        self._scheduler: Scheduler | None = None
        self._runner: ModelRunner | None = None
        self._sampler: BatchSampler | None = None
        self._next_tokens: torch.Tensor | None = None  # per slot: the last sampled token, on the device
        self._in_flight: list[InFlightStep] = []  # launched, not yet collected, in launch order

    # --- the event loop's side -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the worker after its current step; every request still queued or running gets an error."""
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request (call from the event loop); outputs arrive on the returned stream."""
        if self.state is not EngineState.READY:
            raise RuntimeError("engine is not ready")
        needed = request.prompt.num_tokens + request.sampling.max_new_tokens
        if needed > self.config.max_len:
            raise ValueError(f"{needed} tokens do not fit the engine's {self.config.max_len}-token sequences")
        stream = RequestStream(request, asyncio.get_running_loop())
        self._incoming.put(stream)
        return stream

    @property
    def kv_capacity_tokens(self) -> int:
        return max(self.kv_blocks - 1, 0) * BLOCK_SIZE  # block 0 is scratch

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache held by running sequences (0-1)."""
        return self._scheduler.kv_usage if self._scheduler else 0.0

    @property
    def running(self) -> int:
        return len(self._scheduler.running) if self._scheduler else 0

    @property
    def waiting(self) -> int:
        return (len(self._scheduler.waiting) if self._scheduler else 0) + self._incoming.qsize()

    # --- the worker's side ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        if not self._start_up():
            return
        while not self._stopping:
            if not self._take_incoming(block=not self._scheduler.has_work):
                break
            self._step()
        self._fail_everything("the server is shutting down")

    def _start_up(self) -> bool:
        started = time.perf_counter()
        try:
            self.loaded = self._load(self._report_phase)
            config = self.config
            self.prompt_builder = PromptBuilder(self.loaded.processor, config.image_min_pixels,
                                                config.image_max_pixels)
            self._report_phase("planning GPU memory for the KV cache")
            self.slots = config.max_num_seqs
            self._runner = ModelRunner(self.loaded, self.slots, config.max_len)
            self.kv_blocks = plan_blocks(self._runner, self.prompt_builder, config.max_len, config.max_num_seqs,
                                         config.gpu_memory_utilization,
                                         prefill_tokens=max(config.max_len, config.prefill_token_budget),
                                         kv_cache_tokens=config.kv_cache_tokens)
            use_graphs = self.loaded.device.type == "cuda" and not config.enforce_eager
            self._report_phase("capturing CUDA graphs" if use_graphs else "allocating the KV cache")
            self._runner.allocate_cache(self.kv_blocks, use_graphs)
        except Exception as exc:
            log.exception("start-up failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            return False
        self._sampler = BatchSampler(self.slots, self.loaded.vocab_size, self.loaded.device)
        self._next_tokens = torch.zeros(self.slots, dtype=torch.long, device=self.loaded.device)
        self._scheduler = Scheduler(self.slots, self.kv_blocks, self.config.prefill_token_budget)
        self.load_seconds = time.perf_counter() - started
        self.phase = "ready"
        self.state = EngineState.READY
        log.info("engine ready in %.1f s on %s (%s): up to %d sequences of up to %d tokens, KV cache of %d tokens, "
                 "CUDA graphs %s", self.load_seconds, self.loaded.device, str(self.loaded.dtype).removeprefix("torch."),
                 self.slots, self.config.max_len, self.kv_capacity_tokens, "on" if use_graphs else "off")
        return True

    def _take_incoming(self, block: bool) -> bool:
        """Move newly submitted requests to the scheduler; False once `stop` was called."""
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is None:
                    return False
                self._scheduler.add(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            return True

    def _step(self) -> None:
        scheduler = self._scheduler
        for sequence in scheduler.cancelled():
            self._end(sequence, EngineFailure("the request was cancelled"))
        if admitted := scheduler.admissions():
            self._prefill_isolated(admitted)
        try:
            if scheduler.running:
                self._grow_blocks()
            if scheduler.running:
                self._in_flight.append(self._launch_decode())
            # the newest step stays queued on the GPU while the host hands out the tokens of the ones before it
            # (a prefill's first tokens go out as soon as it is done, not one decode step later)
            while len(self._in_flight) > 1:
                self._collect(self._in_flight.pop(0))
        except Exception as exc:
            self._in_flight = []
            self._recover(exc, "a decode step")
            for sequence in list(scheduler.running.values()):
                self._end(sequence, EngineFailure(f"{type(exc).__name__}: {exc}"))

    def _prefill_isolated(self, admitted: list[Admission]) -> None:
        """Prefill the admissions together; if that fails, once more one by one, so that only a request that fails
        on its own is failed (a failed prefill never takes running requests down either)."""
        try:
            self._in_flight.append(self._prefill(admitted))
            return
        except Exception as exc:
            self._recover(exc, f"a prefill of {len(admitted)} requests")
            if len(admitted) == 1:
                self._fail_admission(admitted[0], exc)
                return
        for admission in admitted:
            try:
                self._in_flight.append(self._prefill([admission]))
            except Exception as exc:
                self._recover(exc, f"the prefill of request {admission.stream.request.request_id} alone")
                self._fail_admission(admission, exc)

    def _fail_admission(self, admission: Admission, exc: Exception) -> None:
        admission.stream.put(EngineFailure(f"{type(exc).__name__}: {exc}"))
        self._release(admission.slot)

    def _prefill(self, admitted: list[Admission]) -> InFlightStep:
        """Queue the prompts' prefill and first-token sampling; the new sequences join the decode batch at once
        and their first tokens reach the host with the next collection. A preempted sequence coming back
        prefills its prompt and the tokens it produced."""
        sequences = [admission.resumed or self._new_sequence(admission.stream) for admission in admitted]
        prompts = [sequence.place(admission.slot) for sequence, admission in zip(sequences, admitted, strict=True)]
        logits, rope_deltas = self._runner.prefill([(admission.slot, admission.blocks, prompt)
                                                    for admission, prompt in zip(admitted, prompts, strict=True)])
        rows = self._sampler.admit([SlotHistory(s.slot, s.stream.request.sampling, s.seed,
                                                s.stream.request.prompt.input_ids[0], s.output_ids)
                                    for s in sequences])
        sampled = self._sampler.sample(logits, [s.slot for s in sequences], rows)
        self._next_tokens[rows] = sampled
        for sequence, rope_delta in zip(sequences, rope_deltas, strict=True):
            sequence.rope_delta = rope_delta
            self._scheduler.start(sequence)
        return _in_flight(sequences, sampled)

    def _new_sequence(self, stream: RequestStream) -> Sequence:
        sampling = stream.request.sampling
        return Sequence(
            stream=stream,
            detokenizer=IncrementalDetokenizer(self.loaded.processor.tokenizer),
            stopper=StopStringMatcher(sampling.stop),
            stop_token_ids=frozenset() if sampling.ignore_eos else self.loaded.stop_token_ids,
            seed=sampling.seed if sampling.seed is not None else secrets.randbits(62),
        )

    def _grow_blocks(self) -> None:
        """One more KV block for each sequence whose next step writes past its blocks. When none is free: first
        collect the steps in flight (sequences they finish give blocks back), then preempt the newest sequences."""
        scheduler = self._scheduler
        grown = []
        for sequence in scheduler.outgrowing():
            while scheduler.is_running(sequence):
                if (column_block := scheduler.grow(sequence)) is not None:
                    grown.append((sequence, *column_block))
                    break
                self._make_room()
        grown = [(s.slot, column, block) for s, column, block in grown if scheduler.is_running(s)]
        if grown:
            self._runner.extend_block_tables(grown)

    def _make_room(self) -> None:
        if self._in_flight:
            for step in self._in_flight:
                self._collect(step)
            self._in_flight = []
            return
        sequence = self._scheduler.preempt_newest()  # nothing in flight: all its tokens are on the host
        self._sampler.release(sequence.slot)
        self._runner.release(sequence.slot)
        self.preemptions += 1
        # a warning for the first and every 100th (under sustained overload one per preemption would flood the log)
        level = logging.WARNING if self.preemptions % 100 == 1 else logging.DEBUG
        log.log(level, "KV cache full: request %s preempted after %d tokens; it resumes by recomputing them once "
                "blocks are free (%d preemptions so far; fewer concurrent sequences or a larger cache avoid them)",
                sequence.stream.request.request_id, sequence.produced, self.preemptions)

    def _launch_decode(self) -> InFlightStep:
        """Queue one decode step and its sampling on the device; nothing here waits for the GPU."""
        batch = self._scheduler.decode_batch()
        rows = [DecodeRow(s.slot, s.next_position, s.cache_len) for s in batch]
        logits, row_slots = self._runner.decode(rows, self._next_tokens)
        tokens = self._sampler.sample(logits, [s.slot for s in batch], row_slots)
        self._next_tokens[row_slots] = tokens
        for sequence in batch:
            sequence.sampled += 1
        return _in_flight(batch, tokens)

    def _collect(self, step: InFlightStep) -> None:
        """Hand a finished step's tokens to their sequences; the engine's only wait for the GPU."""
        if step.done is not None:
            step.done.synchronize()
        for sequence, token in zip(step.sequences, step.tokens.tolist(), strict=True):
            if sequence.finished:  # finished or cancelled while this step was in flight
                continue
            try:
                self._emit(sequence, token)
            except Exception as exc:  # detokenizing or stop strings: this request's own failure only
                log.exception("handing out a token of request %s failed", sequence.stream.request.request_id)
                self._end(sequence, EngineFailure(f"{type(exc).__name__}: {exc}"))

    def _emit(self, sequence: Sequence, token: int) -> None:
        output = sequence.accept(token)
        self.tokens_generated += 1
        sequence.stream.put(output)
        if sequence.finished:
            self._release(sequence.slot)

    def _end(self, sequence: Sequence, failure: EngineFailure) -> None:
        sequence.abort()
        sequence.stream.put(failure)
        self._release(sequence.slot)

    def _release(self, slot: int) -> None:
        self._sampler.release(slot)
        self._runner.release(slot)
        self._scheduler.release(slot)

    def _recover(self, exc: Exception, what: str) -> None:
        """After a failed step (CUDA out of memory included): give cached blocks back so the next step can run."""
        log.exception("%s failed", what)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _fail_everything(self, reason: str) -> None:
        for sequence in list(self._scheduler.running.values()):
            self._end(sequence, EngineFailure(reason))
        waiting = self._scheduler.waiting_streams()
        while True:
            try:
                waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        for stream in waiting:
            if stream is not None:
                stream.put(EngineFailure(reason))

    def _report_phase(self, phase: str) -> None:
        log.info("%s", phase)
        self.phase = phase
