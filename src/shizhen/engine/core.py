"""The engine core: owns the model, the KV cache and the scheduler, and runs every request in one continuously
batched loop. No IO, no threads: the engine process (core_process.py) feeds it requests and aborts and sends what
each step returns; benchmarks drive it directly.

Each step plans (aborted sequences end, the step's prompt chunks are chosen, admitting waiting sequences), launches
(one more KV block for sequences that fill their last one, then the chunks and one decode step of every sequence
done prefilling, in one forward pass) and collects the previous step's tokens while this one runs on the GPU. Decode
feeds the sampled tokens back on the device, so the host's per-token work overlaps the next step instead of
stalling it; a sequence that finished is simply dropped from the step already
in flight. Preemption is decided in one place (`_make_room`), failure in one place (`_end` with an error, after
`_recover`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import torch

from .. import load_phase
from ..load_phase import LoadPhase
from .allocation import BLOCK_SIZE
from .grammar import StructuredOutputs
from .loader import LoadedModel
from .memory import plan_blocks
from .model_runner import DecodeRow, ModelRunner, PrefillRow
from .prompt import PromptBuilder
from .request import GenerationRequest
from .sampling import BatchSampler, SlotHistory
from .scheduler import PrefillChunk, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)

# one request's share of a step's result: [request_id, new token ids, finish reason or None, error or None,
# per new token [logprob, top ids, top logprobs] or None, prompt tokens found in the prefix cache or None]
Output = list


@dataclass(frozen=True)
class EngineConfig:
    max_len: int  # prompt + completion tokens per sequence (the context length)
    image_min_pixels: int  # images are resized into this range before the vision tower
    image_max_pixels: int
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.92
    enforce_eager: bool = False  # no CUDA graphs: slower, but debuggable
    kv_cache_tokens: int | None = None  # at most this much KV cache, whatever memory planning allows
    prefill_token_budget: int = 2048  # prompt tokens prefilled per step, between two decode steps (longer: chunks)
    prefix_caching: bool = True  # full KV blocks outlive their request, for later prompts with the same prefix
    image_cache_tokens: int = 16384  # vision-tower outputs kept for photos sent again (image tokens)


class EngineCoreBroken(RuntimeError):
    """A fault that leaves the device unusable (a CUDA error other than running out of memory): the engine process
    must end, and a new one take over."""


@dataclass
class InFlightStep:
    """A launched prefill or decode step: which sequences it sampled for and where their tokens land on the host."""

    sequences: list[Sequence]
    tokens: torch.Tensor  # host copy, filled asynchronously
    logprobs: torch.Tensor | None  # host copy of the sampler's token_logprobs, where a sequence asked for them
    done: torch.cuda.Event | None


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    on_gpu = tensor.device.type == "cuda"
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_gpu)
    host.copy_(tensor, non_blocking=on_gpu)
    return host


def _in_flight(sequences: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor | None) -> InFlightStep:
    """Queue the copies of `tokens` (and `logprobs`) to the host and mark when they have landed."""
    host_tokens = _to_host(tokens)
    host_logprobs = _to_host(logprobs) if logprobs is not None else None
    done = torch.cuda.Event() if tokens.device.type == "cuda" else None
    if done is not None:
        done.record()
    return InFlightStep(sequences, host_tokens, host_logprobs, done)


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 report_phase: Callable[[LoadPhase], None] = lambda phase: None):
        """Plans the KV cache into the memory the loaded model leaves and captures the decode graphs."""
        self.loaded = loaded
        self.config = config
        report_phase(LoadPhase(load_phase.PLANNING_MEMORY, "planning GPU memory for the KV cache"))
        slots = config.max_num_seqs
        self._runner = ModelRunner(loaded, slots, config.max_len, config.image_cache_tokens)
        planning = PromptBuilder(loaded.processor, config.image_min_pixels, config.image_max_pixels)
        self.kv_blocks = plan_blocks(self._runner, planning, config.max_len, slots, config.gpu_memory_utilization,
                                     prefill_tokens=max(config.max_len, config.prefill_token_budget),
                                     kv_cache_tokens=config.kv_cache_tokens)
        self.cuda_graphs = loaded.device.type == "cuda" and not config.enforce_eager
        report_phase(LoadPhase(load_phase.CAPTURING_GRAPHS, "capturing CUDA graphs") if self.cuda_graphs
                     else LoadPhase(load_phase.ALLOCATING_CACHE, "allocating the KV cache"))
        self._runner.allocate_cache(self.kv_blocks, self.cuda_graphs)
        self._sampler = BatchSampler(slots, loaded.vocab_size, loaded.device)
        report_phase(LoadPhase(load_phase.PREPARING_GRAMMARS, "preparing structured outputs for the tokenizer"))
        self._grammars = StructuredOutputs(loaded.processor.tokenizer, loaded.vocab_size, loaded.stop_token_ids,
                                           loaded.device)
        self._compiling: dict[Sequence, futures.Future] = {}  # waiting for their grammar before they queue
        self._next_tokens = torch.zeros(slots, dtype=torch.long, device=loaded.device)  # per slot, on the device
        self._scheduler = Scheduler(slots, self.kv_blocks, config.prefill_token_budget, config.prefix_caching)
        self._sequences: dict[str, Sequence] = {}  # every unfinished one, waiting or running
        self._in_flight: list[InFlightStep] = []  # launched, not yet collected, in launch order
        self._outbox: dict[str, Output] = {}  # what this step tells the API process, per request
        self.tokens_generated = 0  # since start, all requests
        self.preemptions = 0  # since start: sequences that gave their KV blocks back to be recomputed later

    @property
    def kv_capacity_tokens(self) -> int:
        return max(self.kv_blocks - 1, 0) * BLOCK_SIZE  # block 0 is scratch

    def info(self) -> dict:
        loaded = self.loaded
        return {"device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
                "slots": self.config.max_num_seqs, "max_len": self.config.max_len,
                "kv_capacity_tokens": self.kv_capacity_tokens, "cuda_graphs": self.cuda_graphs,
                "sampling_defaults": loaded.sampling_defaults, "folder": loaded.folder}

    def stats(self) -> dict:
        scheduler, images = self._scheduler, self._runner.image_encodings
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_usage": round(scheduler.kv_usage, 4), "preemptions": self.preemptions,
                "tokens_generated": self.tokens_generated, "prefix_queried_tokens": scheduler.prefix_queried_tokens,
                "prefix_hit_tokens": scheduler.prefix_hit_tokens, "image_cache_hits": images.hits,
                "image_cache_misses": images.misses}

    @property
    def has_work(self) -> bool:
        return self._scheduler.has_work or bool(self._compiling)

    # --- requests in ---------------------------------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> None:
        needed = request.prompt.num_tokens + request.sampling.max_new_tokens
        sampling = request.sampling
        stop_token_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos
                                                                 else self.loaded.stop_token_ids)
        sequence = Sequence(request, stop_token_ids,
                            seed=sampling.seed if sampling.seed is not None else secrets.randbits(62))
        if request.request_id in self._sequences:
            self._output(sequence)[3] = f"request id {request.request_id} is already running"
        elif needed > self.config.max_len:
            self._output(sequence)[3] = f"{needed} tokens do not fit the engine's {self.config.max_len}-token sequences"
        else:
            self._sequences[request.request_id] = sequence
            if sampling.grammar is not None:
                self._compiling[sequence] = self._grammars.compile(sampling.grammar)
            else:
                self._scheduler.add(sequence)

    def abort(self, request_ids: list[str]) -> None:
        """The API process gave up on these (client gone, stop string, timeout): no output follows. A waiting one
        leaves the queue now; a running one at the start of the next step."""
        for request_id in request_ids:
            sequence = self._sequences.get(request_id)
            if sequence is None:
                continue
            sequence.aborted = True
            if not self._scheduler.is_running(sequence):
                self._end(sequence)

    # --- one step ------------------------------------------------------------------------------------------------
    def step(self) -> list[Output]:
        """Plan, launch, collect; returns what the step produced, per request. Raises EngineCoreBroken after a fault
        that leaves the device unusable."""
        scheduler = self._scheduler
        self._queue_compiled()
        for sequence in scheduler.aborted():
            self._end(sequence)
        chunks = scheduler.prefill_chunks()
        try:
            if chunks and scheduler.decode_batch():
                self._grow_blocks()  # that may preempt, sequences with a chunk planned too
                chunks = [chunk for chunk in chunks if scheduler.is_running(chunk.sequence)]
            if chunks and (batch := scheduler.decode_batch()):
                self._launch_together(batch, chunks)
            else:
                if chunks:
                    self._prefill_isolated(chunks)
                self._grow_blocks()
                if batch := scheduler.decode_batch():  # after growing: that may preempt
                    self._in_flight.append(self._launch_decode(batch))
            # the newest step stays queued on the GPU while the host hands out the tokens of the ones before it
            # (a prefill alone's first tokens go out as soon as it is done, not one decode step later)
            while len(self._in_flight) > 1:
                self._collect(self._in_flight.pop(0))
        except Exception as exc:
            self._in_flight = []
            self._recover(exc, "a decode step")
            for sequence in list(scheduler.running.values()):
                self._end(sequence, exc)
        return self.take_outputs()

    def take_outputs(self) -> list[Output]:
        outputs, self._outbox = list(self._outbox.values()), {}
        return outputs

    def fail_all(self, reason: str) -> list[Output]:
        """End every request with `reason` (shutdown); returns their outputs."""
        for sequence in list(self._sequences.values()):
            self._end(sequence, reason)
        return self.take_outputs()

    def _queue_compiled(self) -> None:
        """Sequences whose grammar has compiled join the queue (in the order they compiled); one whose grammar
        failed ends with the reason. With nothing else to do, waits a little for a compile instead of spinning."""
        if not self._compiling:
            return
        if not self._scheduler.has_work:
            futures.wait(self._compiling.values(), timeout=0.01, return_when=futures.FIRST_COMPLETED)
        for sequence, compiled in list(self._compiling.items()):
            if not compiled.done():
                continue
            del self._compiling[sequence]
            try:
                sequence.grammar = self._grammars.matcher(compiled.result())
            except Exception as exc:
                self._end(sequence, f"the grammar could not be compiled: {exc}")
                continue
            self._scheduler.add(sequence)

    def _prefill_isolated(self, chunks: list[PrefillChunk]) -> None:
        """Prefill the chunks together; if that fails, once more one by one, so that only a request that fails
        on its own is failed (a failed prefill never takes running requests down either)."""
        try:
            self._prefill(chunks)
            return
        except Exception as exc:
            self._recover(exc, f"a prefill of {len(chunks)} requests")
            if len(chunks) == 1:
                self._end(chunks[0].sequence, exc)
                return
        for chunk in chunks:
            try:
                self._prefill([chunk])
            except Exception as exc:
                self._recover(exc, f"the prefill of request {chunk.sequence.request_id} alone")
                self._end(chunk.sequence, exc)

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        logits, rope_deltas = self._runner.prefill(_prefill_rows(chunks))
        completed, tokens = self._sample_first(chunks, logits, rope_deltas)
        if completed:
            self._in_flight.append(_in_flight(completed, tokens, self._logprobs(completed, logits, tokens)))

    def _sample_first(self, chunks: list[PrefillChunk], logits: torch.Tensor,
                      rope_deltas: list[int]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The chunks' prefill is queued: sample the first token of the prompts it completes (`logits`, one row
        each), which decode from the next step on. A preempted sequence coming back prefills its prompt and the
        tokens it produced (what is still cached skipped). Returns those sequences and their tokens (device)."""
        completed = [chunk.sequence for chunk in chunks if chunk.final]
        self._scheduler.prefilled(chunks)
        if not completed:
            return [], None
        rows = self._sampler.admit([SlotHistory(s.slot, s.request.sampling, s.seed, s.request.prompt.input_ids[0],
                                                s.output_ids) for s in completed])
        sampled = self._sampler.sample(logits, [s.slot for s in completed], rows,
                                       _banned([(s, s.produced) for s in completed]), self._constraint(completed))
        self._next_tokens[rows] = sampled
        for sequence, rope_delta in zip(completed, rope_deltas, strict=True):
            sequence.rope_delta = rope_delta
        return completed, sampled

    def _launch_together(self, batch: list[Sequence], chunks: list[PrefillChunk]) -> None:
        """One decode step of `batch` and the prompt chunks in the same forward pass: decoding sequences wait
        for no separate prefill step, and every weight is read once for both. If it fails, the chunks are
        prefilled alone (one by one if need be) and the decode step runs alone, so that only what fails on its
        own is failed."""
        try:
            decode_logits, row_slots, prefill_logits, rope_deltas = self._runner.prefill_and_decode(
                _decode_rows(batch), self._next_tokens, _prefill_rows(chunks))
            completed, first_tokens = self._sample_first(chunks, prefill_logits, rope_deltas)
        except Exception as exc:  # nothing of the decode step is taken yet: it is simply run again, alone
            self._recover(exc, f"a step of {len(batch)} decodes and {len(chunks)} prompt chunks")
            self._prefill_isolated(chunks)
            self._in_flight.append(self._launch_decode(batch))
            return
        tokens = self._sample_decode(batch, decode_logits, row_slots)
        if completed:  # one step in flight, as it is one pass on the device
            tokens, decode_logits = torch.cat([tokens, first_tokens]), torch.cat([decode_logits, prefill_logits])
        sequences = batch + completed
        self._in_flight.append(_in_flight(sequences, tokens, self._logprobs(sequences, decode_logits, tokens)))

    def _grow_blocks(self) -> None:
        """One more KV block for each sequence whose next step writes past its blocks, making room when none is
        free."""
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
        """The preemption policy: first collect the steps in flight (sequences they finish give blocks back), then
        preempt the newest sequence."""
        if self._in_flight:
            self._collect_all()
            return
        sequence = self._scheduler.preempt_newest()  # nothing in flight: all its tokens are on the host
        self._sampler.release(sequence.slot)
        self._runner.release(sequence.slot)
        self.preemptions += 1
        # a warning for the first and every 100th (under sustained overload one per preemption would flood the log)
        level = logging.WARNING if self.preemptions % 100 == 1 else logging.DEBUG
        log.log(level, "KV cache full: request %s preempted after %d tokens; it resumes by recomputing them once "
                "blocks are free (%d preemptions so far; fewer concurrent sequences or a larger cache avoid them)",
                sequence.request_id, sequence.produced, self.preemptions)

    def _launch_decode(self, batch: list[Sequence]) -> InFlightStep:
        """Queue one decode step of `batch` and its sampling on the device; nothing here waits for the GPU."""
        logits, row_slots = self._runner.decode(_decode_rows(batch), self._next_tokens)
        tokens = self._sample_decode(batch, logits, row_slots)
        return _in_flight(batch, tokens, self._logprobs(batch, logits, tokens))

    def _sample_decode(self, batch: list[Sequence], logits: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """The batch's next tokens from its decode logits, fed to the next step on the device."""
        if any(s.grammar is not None for s in batch):
            # a grammar's mask needs the token before this one: collect the steps in flight while the GPU runs
            # this step's forward pass (only its sampling waits for the mask)
            self._collect_all()
        tokens = self._sampler.sample(logits, [s.slot for s in batch], row_slots,
                                      _banned([(s, s.sampled) for s in batch]), self._constraint(batch))
        self._next_tokens[row_slots] = tokens
        for sequence in batch:
            sequence.sampled += 1
        return tokens

    def _constraint(self, sequences: list[Sequence]) -> Callable[[torch.Tensor], None] | None:
        """The grammar mask for a step's rows, where any of its sequences (still running) follows a grammar."""
        rows = [(row, s.grammar) for row, s in enumerate(sequences) if s.grammar is not None and not s.finished]
        return (lambda logits: self._grammars.apply(logits, rows)) if rows else None

    def _logprobs(self, sequences: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """The step's log-probabilities, for all its rows, if any of its sequences asked for them."""
        asked = [s.request.sampling.logprobs for s in sequences if s.request.sampling.logprobs is not None]
        return self._sampler.token_logprobs(logits, tokens, max(asked)) if asked else None

    def _collect_all(self) -> None:
        """Collect every step in flight, in launch order (the list is emptied in place: callers may hold it)."""
        for step in self._in_flight:
            self._collect(step)
        self._in_flight.clear()

    def _collect(self, step: InFlightStep) -> None:
        """Hand a finished step's tokens to their sequences; the engine's only wait for the GPU."""
        if step.done is not None:
            step.done.synchronize()
        logprobs = step.logprobs.tolist() if step.logprobs is not None else None
        for row, (sequence, token) in enumerate(zip(step.sequences, step.tokens.tolist(), strict=True)):
            if sequence.finished:  # finished or aborted while this step was in flight
                continue
            reason = sequence.accept(token)
            self.tokens_generated += 1
            output = self._output(sequence)
            output[1].append(token)
            if (top := sequence.request.sampling.logprobs) is not None:
                values, width = logprobs[row], (len(logprobs[row]) - 1) // 2
                output[4].append([values[0], [int(i) for i in values[1 : 1 + top]],
                                  values[1 + width : 1 + width + top]])
            if reason:
                output[2] = reason
                self._end(sequence)

    def _output(self, sequence: Sequence) -> Output:
        output = self._outbox.get(sequence.request_id)
        if output is None:
            logprobs = [] if sequence.request.sampling.logprobs is not None else None
            output = self._outbox[sequence.request_id] = [sequence.request_id, [], None, None, logprobs,
                                                          sequence.cached_tokens]
        return output

    def _end(self, sequence: Sequence, error: Exception | str | None = None) -> None:
        """The one way out for a sequence: finished, aborted or failed (`error` tells the API process why)."""
        sequence.finished = True
        self._sequences.pop(sequence.request_id, None)
        self._compiling.pop(sequence, None)
        if error is not None and not sequence.aborted:
            message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            self._output(sequence)[3] = message
        if self._scheduler.is_running(sequence):
            self._sampler.release(sequence.slot)
            self._runner.release(sequence.slot)
            self._scheduler.release(sequence.slot, cache=error is None)
        elif sequence in self._scheduler.waiting:
            self._scheduler.drop_waiting(sequence)

    def _recover(self, exc: Exception, what: str) -> None:
        """After a failed step: give cached blocks back so the next step can run (CUDA out of memory included); a
        fault that breaks the device ends the engine instead."""
        log.exception("%s failed", what)
        if is_device_fault(exc):
            raise EngineCoreBroken(f"{type(exc).__name__}: {exc}") from exc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _decode_rows(batch: list[Sequence]) -> list[DecodeRow]:
    return [DecodeRow(s.slot, s.next_position, s.cache_len) for s in batch]


def _prefill_rows(chunks: list[PrefillChunk]) -> list[PrefillRow]:
    return [PrefillRow(c.sequence.slot, c.blocks, c.sequence.prefill, c.start, c.end) for c in chunks]


def _banned(rows: list[tuple[Sequence, int]]) -> list[tuple[int, int]]:
    """(row, token id) pairs the sampler must not draw: a sequence's stop tokens while fewer than its min_tokens
    came before the token being sampled. `rows`: each row's sequence and how many tokens precede its new one."""
    return [(row, token) for row, (sequence, before) in enumerate(rows)
            if before < sequence.request.sampling.min_tokens and sequence.grammar is None  # a grammar says when
            for token in sequence.stop_token_ids]


def is_device_fault(exc: Exception) -> bool:
    """A CUDA error that is not running out of memory (an illegal address, a failed launch, ECC): every later
    call on this context fails too."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or "CUDA error" in str(exc)
