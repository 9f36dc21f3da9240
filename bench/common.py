"""What the benchmarks share: JSON-line output, GPU timing of CUDA graphs and a real `shizhen serve` on the tiny
checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch


def emit(rows: list[dict], row: dict) -> None:
    """Print one result as a JSON line (as soon as it is measured) and keep it for `write_json`."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def write_json(rows: list[dict], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20) -> float:
    """GPU milliseconds per replay of `graph`, measured with CUDA events after one warm replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def serve_tiny(checkpoint: Path, port: int, *flags: str, ready_timeout: float = 60) -> subprocess.Popen:
    """The real server command in its own process, as in production; returns once /health says ready."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shizhen.cli", "serve", "--model", str(checkpoint), "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning", *flags],
        stdout=subprocess.DEVNULL,  # its warnings and errors go to stderr
    )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start (exit code {process.poll()})")


@dataclass
class Timeline:
    """One request as a benchmark saw it: when it was handed over, and when each batch of its tokens came out."""

    submitted: float
    outputs: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in that output)
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache

    @property
    def first(self) -> float:
        return self.outputs[0][0]

    @property
    def last(self) -> float:
        return self.outputs[-1][0]

    @property
    def tokens(self) -> int:
        return sum(count for _, count in self.outputs)

    def gaps(self) -> list[float]:
        return [b - a for (a, _), (b, _) in zip(self.outputs, self.outputs[1:])]


def run_core(core, requests: list, arrivals: list[float]) -> list[Timeline]:
    """Engine-direct: drive an EngineCore in this process (no HTTP, no second process), each request added at its
    arrival time (seconds from now); returns each request's timeline."""
    start = time.perf_counter()
    pending = sorted(range(len(requests)), key=lambda index: arrivals[index])
    timelines: dict[str, Timeline] = {}
    unfinished = set()
    while pending or unfinished:
        now = time.perf_counter()
        while pending and arrivals[pending[0]] <= now - start:
            request = requests[pending.pop(0)]
            timelines[request.request_id] = Timeline(time.perf_counter())
            unfinished.add(request.request_id)
            core.add(request)
        outputs = core.step() if core.has_work else core.take_outputs()
        now = time.perf_counter()
        for request_id, tokens, finish_reason, error, _logprobs, cached_tokens in outputs:
            if error:
                raise RuntimeError(f"{request_id}: {error}")
            timeline = timelines[request_id]
            timeline.cached_tokens = cached_tokens
            timeline.outputs.append((now, len(tokens)))
            timeline.token_ids += tokens
            if finish_reason:
                unfinished.discard(request_id)
        if not core.has_work and pending:
            time.sleep(max(0.0, min(0.001, arrivals[pending[0]] - (time.perf_counter() - start))))
    return [timelines[request.request_id] for request in requests]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]
