"""The engine process: one EngineCore behind two ZeroMQ sockets, so HTTP, prompt building and detokenizing in the
API process never take the GIL from the step loop.

It is forked from the API process (which never touches CUDA) and connects to the two sockets the API process bound:
requests and aborts in, one message of outputs per step out. It ignores SIGINT and SIGTERM (the API process drains
first, then says "shutdown") and exits when the API process is gone. A fault that breaks the device ends it with
exit code 1; the API process then starts another (client.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
import zmq

from ..load_phase import LoadPhase
from . import wire
from .core import EngineConfig, EngineCore, EngineCoreBroken
from .loader import LoadedModel

log = logging.getLogger(__name__)
IDLE_POLL_MS = 1000  # how often an idle engine checks that the API process is still there
GPU_MEMORY_EVERY_S = 1.0
GIB = 1024**3


def run_engine_process(load: Callable[[Callable[[str], None]], LoadedModel], config: EngineConfig,
                       input_address: str, output_address: str, incarnation: int, api_pid: int) -> None:
    """The process's main: load, say "ready", then serve until "shutdown" or the API process's end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # OpenMP (libgomp) is not fork-safe: a forked child whose parent used its thread pool hangs in the first
    # parallel region unless it runs them on one thread. The engine's host work is small; the GPU does the rest.
    torch.set_num_threads(1)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 2000)
    outbox.connect(output_address)

    def send(kind: str, payload=None) -> None:
        outbox.send(wire.pack(incarnation, kind, payload))

    def report_phase(phase: LoadPhase) -> None:
        log.info("%s", phase.detail)
        send(wire.PHASE, phase)

    exit_code = 0
    try:
        started = time.perf_counter()
        try:
            core = EngineCore(load(report_phase), config, report_phase)
        except Exception as exc:
            log.exception("start-up failed")
            send(wire.FAILED, f"{type(exc).__name__}: {exc}")
            return
        info = core.info() | {"load_seconds": round(time.perf_counter() - started, 2)}
        log.info("engine ready in %.1f s on %s (%s): up to %d sequences of up to %d tokens, KV cache of %d tokens, "
                 "CUDA graphs %s", info["load_seconds"], info["device"], info["dtype"], info["slots"],
                 info["max_len"], info["kv_capacity_tokens"], "on" if info["cuda_graphs"] else "off")
        send(wire.READY, info)
        exit_code = _StepLoop(core, inbox, send, incarnation, api_pid).run()
    finally:
        inbox.close(linger=0)
        outbox.close()
        context.term()
    sys.exit(exit_code)


class _StepLoop:
    def __init__(self, core: EngineCore, inbox: zmq.Socket, send: Callable, incarnation: int, api_pid: int):
        self._core = core
        self._inbox = inbox
        self._send = send
        self._incarnation = incarnation
        self._api_pid = api_pid
        self._sent_stats: dict | None = None
        self._gpu_memory: dict = {}
        self._gpu_memory_at = 0.0

    def run(self) -> int:
        core = self._core
        while True:
            if not self._read_inbox(block=not core.has_work):
                self._send_outputs(core.fail_all("the server is shutting down"))
                return 0
            if os.getppid() != self._api_pid:
                log.warning("the API process is gone; the engine process exits")
                return 0
            try:
                outputs = core.step() if core.has_work else core.take_outputs()
            except EngineCoreBroken as exc:
                log.error("the engine cannot go on (%s); exiting so that a new engine process takes over", exc)
                self._send(wire.FAILED, str(exc))
                return 1
            self._send_outputs(outputs)

    def _read_inbox(self, block: bool) -> bool:
        """Take every message waiting; False once "shutdown" came. Blocks (for a while) only when idle."""
        if block and not self._inbox.poll(IDLE_POLL_MS):
            return True
        while True:
            try:
                frames = self._inbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            incarnation, kind, payload = wire.unpack(frames[0].bytes)
            if incarnation != self._incarnation:
                continue  # queued for an engine process that is gone
            if kind == wire.SHUTDOWN:
                return False
            try:
                if kind == wire.ADD:
                    self._core.add(wire.decode_request(payload, [frame.buffer for frame in frames]))
                elif kind == wire.ABORT:
                    self._core.abort(payload)
            except Exception:
                log.exception("a %r message could not be read; ignored", kind)

    def _send_outputs(self, outputs: list) -> None:
        """One message per step with every request's new tokens, plus the counters when they changed."""
        stats = self._core.stats() | {"gpu_memory": self._sampled_gpu_memory()}
        if outputs or stats != self._sent_stats:
            self._send(wire.OUTPUTS, [outputs, stats])
            self._sent_stats = stats

    def _sampled_gpu_memory(self) -> dict:
        now = time.monotonic()
        if now - self._gpu_memory_at >= GPU_MEMORY_EVERY_S:
            self._gpu_memory, self._gpu_memory_at = gpu_memory(), now
        return self._gpu_memory


def gpu_memory() -> dict[str, dict[str, float]]:
    """Per GPU: GiB in use by this process's tensors and reserved by its allocator, free/total as the driver sees."""
    report = {}
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        report[f"cuda:{index}"] = {
            "allocated_gib": round(torch.cuda.memory_allocated(index) / GIB, 2),
            "reserved_gib": round(torch.cuda.memory_reserved(index) / GIB, 2),
            "free_gib": round(free / GIB, 2),
            "total_gib": round(total / GIB, 2),
        }
    return report
